"""A benchmark's table, kept as it is measured: each line is printed and the whole table rewritten to
the --out file at once, so a run stopped midway (benchmarks/gpu_check.sh gives each stage a time
limit) keeps every row measured before."""


class Table:
    def __init__(self, path=None):
        self.path, self.lines = path, []

    def add(self, line):
        self.lines.append(line)
        print(line, flush=True)
        if self.path:
            with open(self.path, "w") as f:
                f.write("\n".join(self.lines) + "\n")
