//! Serving the services on a unix socket.

use std::path::Path;

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

use crate::controller::ControllerService;
use crate::csi::controller_server::ControllerServer;
use crate::csi::identity_server::IdentityServer;
use crate::csi::node_server::NodeServer;
use crate::identity::IdentityService;
use crate::node::NodeService;

/// `unix:///path/csi.sock` or a plain path → the socket path.
pub fn socket_path(endpoint: &str) -> &str {
    endpoint.strip_prefix("unix://").unwrap_or(endpoint)
}

pub async fn serve(
    socket: &Path,
    controller: Option<ControllerService>,
    node: Option<NodeService>,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    if let Some(d) = socket.parent() {
        std::fs::create_dir_all(d)?;
    }
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket)?;
    let identity = IdentityService {
        controller: controller.is_some(),
    };
    let router = tonic::transport::Server::builder()
        .add_service(IdentityServer::new(identity))
        .add_optional_service(controller.map(ControllerServer::new))
        .add_optional_service(node.map(NodeServer::new));
    router
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
        .map_err(std::io::Error::other)
}
