"""Live events: the task and device event log as a Server-Sent Events stream."""
