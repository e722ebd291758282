"""`python -m backend [uvicorn's options]`: the service as production runs it (see launcher.py)."""

from backend.platform.server.launcher import main

# Guarded: uvicorn's workers and reloader are spawned processes, which import this module again.
if __name__ == "__main__":
    main()
