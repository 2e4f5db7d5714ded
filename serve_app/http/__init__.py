"""HTTP plumbing every route shares: request ids, body parsing, error envelopes (``plumbing``),
server-sent events (``sse``) and admin authentication (``admin_auth``)."""
