"""How the service is served: uvicorn with a protocol of ours (`protocol.py`), which bounds each
request's header block, and the launcher behind `python -m backend` (`launcher.py`)."""
