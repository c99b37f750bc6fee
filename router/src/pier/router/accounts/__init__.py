"""Users' connected accounts: upstream OAuth per (user, profile), token exchange (RFC 8693), and the
tokens their sessions receive (`provider`: talking to authorization servers, `flows`: authorizations in
progress, `store`: where connections live, `service`: `Accounts`, what the router asks)."""
