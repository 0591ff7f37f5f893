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
# The packages and the user come from the same two files as the test-bed image that the
# end-to-end suite runs (e2e/image/build.sh): e2e/image/packages.txt and e2e/image/setup.sh.
COPY e2e/image/packages.txt e2e/image/setup.sh /tmp/image/
RUN apt-get update \
    && grep -v '^[[:space:]]*\(#\|$\)' /tmp/image/packages.txt \
       | xargs env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
    && sh /tmp/image/setup.sh \
    && rm -rf /tmp/image
COPY --from=build /out/ /usr/local/bin/
# Non-root by default: the operator, the CSI controller and mount Pods (--mount-mode pod) run
# as 65532, which owns the files of volumes kept on a node; mount Pods have no capability and
# no privilege (the FUSE descriptor comes over the node plugin's socket). The node plugin and
# cache members mount FUSE: their pod specs run them privileged as root.
USER 65532:65532
ENTRYPOINT []
CMD ["strata", "--help"]
