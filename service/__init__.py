"""AI Multi-Comms Engine: AI-written WhatsApp, SMS and email conversations over SQS and DynamoDB."""

__version__ = "0.1.0"
