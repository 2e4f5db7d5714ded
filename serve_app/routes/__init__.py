"""HTTP and WebSocket routes, each built by a factory over one GatewayCore."""
