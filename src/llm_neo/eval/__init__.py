"""Evaluation of a student: held-out metrics against a live or a cached teacher, generation and task
scoring. Import from the submodules."""
