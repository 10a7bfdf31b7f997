"""A generation's life apart from HTTP: parameters, lifecycle, schedule, conversations, deliveries, media."""
