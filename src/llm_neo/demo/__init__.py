"""`llm-neo demo`: the built-in task, the run of every stage on it, and the report."""
