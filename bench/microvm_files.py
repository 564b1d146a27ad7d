#!/usr/bin/env python3
"""Files API throughput into and out of one microvm sandbox, beside `dd` inside the guest
(the guest's own disk speed), through the unmodified `e2b` SDK against a running server:

    E2B_API_URL=http://127.0.0.1:PORT E2B_SANDBOX_URL=http://127.0.0.1:PORT E2B_API_KEY=KEY \\
        .venv/bin/python bench/microvm_files.py

Every byte crosses the agent's channel (virtio-serial) and is written by the agent inside the
guest; under TCG the agent's own per-byte work is what shows (see docs/PERFORMANCE.md).
"""

import time

from e2b import Sandbox


def main():
    s = Sandbox.create(template="base@microvm", timeout=300)
    try:
        for n in (4, 16):
            t = time.time()
            s.files.write("/home/user/x.bin", b"\0" * (n << 20))
            print(f"files.write {n} MiB: {time.time() - t:.2f} s")
        t = time.time()
        s.commands.run("dd if=/dev/zero of=/home/user/y bs=1M count=16 2>/dev/null; sync")
        print(f"dd 16 MiB inside the guest (with sync): {time.time() - t:.2f} s")
        t = time.time()
        s.files.read("/home/user/x.bin", format="bytes")
        print(f"files.read 16 MiB: {time.time() - t:.2f} s")
    finally:
        s.kill()


if __name__ == "__main__":
    main()
