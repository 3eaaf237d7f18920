"""Mail in: the SMTP listener (aiosmtpd), who may relay, the Received header."""
