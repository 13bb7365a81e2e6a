"""tool: see every network connection on this host, refuse the undeclared ones."""
