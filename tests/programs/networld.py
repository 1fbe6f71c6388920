"""The outside world of tests/network.rs, run in a network namespace the
test made: a stand-in DNS server (a.test, b.test) and two HTTP servers, one
per name, plus a port on a.test that accepts connections and holds them.
Prints "ready" once everything listens."""
import http.server
import socket
import socketserver
import struct
import sys
import threading

DNS, A, B = sys.argv[1], sys.argv[2], sys.argv[3]
ZONE = {"a.test": A, "b.test": B}


def dns():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((DNS, 53))
    ready.release()
    while True:
        q, peer = s.recvfrom(4096)
        try:
            tid = struct.unpack(">H", q[:2])[0]
            i, labels = 12, []
            while q[i]:
                labels.append(q[i + 1 : i + 1 + q[i]].decode())
                i += 1 + q[i]
            qtype = struct.unpack(">H", q[i + 1 : i + 3])[0]
            question = q[12 : i + 5]
        except Exception:
            continue
        ip = ZONE.get(".".join(labels).lower())
        flags = 0x8180 if ip else 0x8183  # NOERROR / NXDOMAIN
        if ip and qtype == 1:
            answer = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + socket.inet_aton(ip)
            s.sendto(struct.pack(">HHHHHH", tid, flags, 1, 1, 0, 0) + question + answer, peer)
        else:
            s.sendto(struct.pack(">HHHHHH", tid, flags, 1, 0, 0, 0) + question, peer)


def site(addr, name):
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = f"site {name}\n".encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = socketserver.ThreadingTCPServer((addr, 80), H)
    ready.release()
    srv.serve_forever()


def holder(addr):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, 81))
    s.listen(16)
    ready.release()
    held = []
    while True:
        c, _ = s.accept()
        held.append(c)


ready = threading.Semaphore(0)
jobs = [(dns, ()), (site, (A, "a")), (site, (B, "b")), (holder, (A,))]
for f, args in jobs:
    threading.Thread(target=f, args=args, daemon=True).start()
for _ in jobs:
    ready.acquire()
print("ready", flush=True)
sys.stdin.read()  # until the test closes it
