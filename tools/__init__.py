"""The ``tritonsd`` command line: ``cli`` dispatches to one module per subcommand, each a thin shell that parses
flags into the library's settings and calls it."""
