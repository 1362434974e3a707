"""The Python child of the side-by-side benchmark (run by the project's venv interpreter).

With $PORT set it listens on 127.0.0.1:$PORT and accepts and closes connections (a tcp
readiness probe then succeeds); without it, it sleeps. SIGTERM and SIGINT end it at once,
as they end /bin/sleep (pm2 stops with SIGINT, the others with SIGTERM).
"""

import os
import signal
import socket
import time

signal.signal(signal.SIGINT, signal.SIG_DFL)
signal.signal(signal.SIGTERM, signal.SIG_DFL)
port = os.environ.get("PORT")
if port:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", int(port)))
    server.listen(128)
    while True:
        conn, _ = server.accept()
        conn.close()
else:
    while True:
        time.sleep(3600)
