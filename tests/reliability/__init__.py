"""The reliability and security suite (RELIABILITY.md): real servers on 127.0.0.1, bounded."""
