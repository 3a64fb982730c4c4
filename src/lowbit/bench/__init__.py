"""Speed benchmarks behind `lowbit bench ...`; each returns plain data that the CLI prints and saves."""
