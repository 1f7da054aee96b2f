"""pair: not written yet."""

def add_args(parser):
    pass


def run(args):
    raise SystemExit("not written yet")
