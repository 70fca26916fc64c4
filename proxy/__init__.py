"""The transparent proxy: accepts diverted connections, recovers the original
destination, peeks at the first bytes (TLS SNI, HTTP Host), decides with the
policy, relays, and writes one audit record per connection."""
