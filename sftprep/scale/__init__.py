"""Scale: batches through threads or processes (pipeline), parts of a build, merge, executors."""
