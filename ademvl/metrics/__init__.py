"""Metrics shared by several tasks (each task's own scorer lives in its module under ademvl/tasks/)."""
