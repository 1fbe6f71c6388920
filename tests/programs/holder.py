import hashlib, http.server, mmap, os, random, sys
port, mib = int(sys.argv[1]), int(sys.argv[2])
# private anonymous memory, page-aligned (a page of it is a page)
buf = mmap.mmap(-1, mib << 20, flags=mmap.MAP_PRIVATE)
for off in range(0, len(buf), 1 << 20):
    buf[off:off + (1 << 20)] = os.urandom(1 << 20)
# and 1 MiB of shared memory (CRIU dumps shmem whole every time)
shared = mmap.mmap(-1, 1 << 20)
shared[:] = os.urandom(1 << 20)
pages = len(buf) // 4096
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/dirty":
            for p in random.sample(range(pages), pages // 100):
                buf[p * 4096:(p + 1) * 4096] = os.urandom(4096)
            shared[:4096] = os.urandom(4096)
        h = hashlib.sha256(buf)
        h.update(shared)
        body = h.hexdigest().encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
