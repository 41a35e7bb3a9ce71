"""Code shared by the API and the worker: settings, schema access, broker topology, messages."""
