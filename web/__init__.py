"""The HTTP side: blueprints, reading requests, rendering answers, the one error mapping, access, the edge."""
