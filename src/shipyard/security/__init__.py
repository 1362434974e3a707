"""Who may use the control plane: authentication (unix peer credentials, bearer tokens,
client certificates), roles, TLS, the audit trail and the request limits.

`shipyard.security.permissions.allow(resource, verb)` is what every API route declares."""
