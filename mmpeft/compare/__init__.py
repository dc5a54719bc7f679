"""Fine-tuning configurations side by side, each run in a fresh process, with tables and charts."""
