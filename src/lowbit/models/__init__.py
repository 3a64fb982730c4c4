"""Model families lowbit knows how to walk, and how models are loaded from their sources."""
