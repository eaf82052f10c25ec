"""`python -m equip.predict model=… images=…`: the command; the work is in equip.serve.predict."""

from equip.serve.predict import main

if __name__ == "__main__":
    raise SystemExit(main())
