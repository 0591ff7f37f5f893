# One image for every Strata component: strata (CLI + FUSE client, used by mount pods and
# cache members), strata-csi (node plugin and controller), strata-operator.
#   docker build -t ghcr.io/strata-fs/strata:0.1.0 .
FROM rust:1.95-bookworm AS build
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      protobuf-compiler libfuse3-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY fs-core fs-core
COPY csi-driver csi-driver
COPY operator operator
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p fs-core -p strata-csi -p strata-operator \
      --bin strata --bin strata-csi --bin strata-operator \
    && mkdir -p /out \
    && cp target/release/strata target/release/strata-csi target/release/strata-operator /out/

FROM debian:bookworm-slim
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      fuse3 ca-certificates util-linux \
    && rm -rf /var/lib/apt/lists/* \
    && echo user_allow_other >> /etc/fuse.conf \
    && groupadd --gid 65532 strata \
    && useradd --uid 65532 --gid 65532 --no-create-home --shell /usr/sbin/nologin strata
COPY --from=build /out/ /usr/local/bin/
# Non-root by default (operator, CSI controller). The node plugin and cache members mount
# FUSE and run privileged as root (their pod specs set it); mount Pods (--mount-mode pod) run
# as uid 0 with every capability dropped and no privilege: they only serve the FUSE
# descriptor the node plugin hands them over its root-owned socket.
USER 65532:65532
ENTRYPOINT []
CMD ["strata", "--help"]
