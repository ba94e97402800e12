"""Install and start real test peers (PostgreSQL, Kerberos, pgbouncer, …) for dbproxy."""
