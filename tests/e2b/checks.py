"""The one assertion helper the conformance scripts share: each check prints one line, and
the first failure raises with the check's name and what was seen."""

passed = 0


def check(name, cond, detail=""):
    global passed
    passed += 1
    if not cond:
        raise AssertionError(f"{name}: {detail}")
    print(f"ok   {name}")
