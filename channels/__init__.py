"""Chat front-ends over the same lifecycle: Telegram (Discord and Slack next)."""
