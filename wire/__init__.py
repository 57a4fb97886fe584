"""Transport pieces shared by the slave's server and its clients (addresses, TLS)."""
