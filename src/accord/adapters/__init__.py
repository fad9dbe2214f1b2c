"""Adapters and stores for each engine: memory, redis, postgres, rabbitmq."""
