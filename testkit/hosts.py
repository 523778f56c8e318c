"""Names that resolve to several loopback addresses, through /etc/hosts: pods behind one name
(a Kubernetes headless Service) on one machine. glibc returns every address of a name listed on
several lines (`multi on`, Debian's default). Needs write access to /etc/hosts (root); every line
added carries a marker and is removed again, so the machine is left as it was."""

import itertools
import os
from pathlib import Path

HOSTS = Path("/etc/hosts")
_instances = itertools.count()


class HostsEntries:
    def __init__(self, path: Path = HOSTS):
        self.path = path
        self.marker = f"# glm-image-serve test {os.getpid()}-{next(_instances)}"

    @staticmethod
    def writable(path: Path = HOSTS) -> bool:
        return os.access(path, os.W_OK)

    def _write(self, lines: list[str]) -> None:
        # in place, not by rename: /etc/hosts is often a bind mount
        self.path.write_text("".join(lines))

    def add(self, address: str, name: str) -> None:
        lines = self.path.read_text().splitlines(keepends=True)
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        self._write([*lines, f"{address} {name} {self.marker}\n"])

    def remove(self, address: str | None = None) -> None:
        """Removes this process's lines (only `address`'s when given)."""

        def ours(line: str) -> bool:
            return line.rstrip().endswith(self.marker) and (address is None or line.split()[0] == address)

        self._write([line for line in self.path.read_text().splitlines(keepends=True) if not ours(line)])
