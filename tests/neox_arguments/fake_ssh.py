"""A stand-in for `subprocess.Popen` of the ssh commands deepy.py's host checks run (megatron/host_checks.py)."""
import os
import shlex


class FakeSsh:
    """Call it like Popen. `down`: host -> ssh's error line (exit 255). `views`: host -> {path: (size, mtime)}
    overriding what the host reports for a path (None: the file is missing there); other files report this
    machine's own stat. `aliases`: host -> the HostName `ssh -G` prints."""

    def __init__(self, down=None, views=None, aliases=None):
        self.down, self.views, self.aliases = dict(down or {}), dict(views or {}), dict(aliases or {})
        self.commands = []

    def __call__(self, argv, **kwargs):
        self.commands.append(list(argv))
        return _Proc(self, list(argv))


class _Proc:
    def __init__(self, fake, argv):
        self.fake, self.argv, self.returncode = fake, argv, None

    def communicate(self, timeout=None):
        fake, argv = self.fake, self.argv
        assert argv[0] == "ssh", argv
        if "-G" in argv:
            host = argv[-1]
            self.returncode = 0
            return f"user root\nhostname {fake.aliases.get(host, host)}\nport 22\n", ""
        host, command = argv[-2], argv[-1]
        if host in fake.down:
            self.returncode = 255
            return "", f"Warning: something\n{fake.down[host]}\n"
        self.returncode = 0
        if command == "true":
            return "", ""
        words = shlex.split(command.split(" 2>/dev/null")[0])
        paths = words[words.index("--") + 1:]
        lines = []
        for p in paths:
            view = fake.views.get(host, {})
            if p in view:
                if view[p] is not None:
                    lines.append(f"{view[p][0]} {view[p][1]} {p}")
            elif os.path.exists(p):
                st = os.stat(p)
                lines.append(f"{st.st_size} {int(st.st_mtime)} {p}")
        return "".join(line + "\n" for line in lines), ""

    def kill(self):
        pass
