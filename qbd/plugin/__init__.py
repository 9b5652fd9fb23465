"""The parts of qbd's pytest plugin (qbd.pytest_plugin holds its hooks and fixtures): state,
options, cases, session, collector."""
