#!/usr/bin/env bash
# Opens a run's report.html in headless Chromium (Debian's `chromium` package), takes a
# screenshot and checks two things: the page loads nothing (no network request of the page in
# Chromium's NetLog, no src/href/url() that is not inline data), and the screenshot is not blank
# (more than one colour, and a real share of the page not white). Outside `cargo test`: it needs
# Chromium.
#
#   scripts/report-screenshot.sh RUN_DIR [OUT.png] [WIDTH,HEIGHT]
#
# RUN_DIR holds report.html (e.g. runs/quickstart after the quickstart); OUT.png defaults to
# RUN_DIR/report.png, the window to 1280,2400. Exits 0 when both checks pass, 1 when one fails,
# 2 when Chromium or python3 is missing. Install Chromium with `apt-get install -y chromium`.
set -euo pipefail

run=${1:?usage: scripts/report-screenshot.sh RUN_DIR [OUT.png] [WIDTH,HEIGHT]}
report=$(realpath "$run/report.html")
out=$(realpath -m "${2:-$run/report.png}")
size=${3:-1280,2400}

chromium=$(command -v chromium || command -v chromium-browser || true)
if [[ -z $chromium ]]; then
    echo "report-screenshot: no chromium on PATH (apt-get install -y chromium)" >&2
    exit 2
fi
if ! command -v python3 >/dev/null; then
    echo "report-screenshot: needs python3 for the checks" >&2
    exit 2
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The flags keep Chromium's own background traffic off, so the NetLog shows the page's requests.
"$chromium" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --disable-default-apps --disable-extensions --hide-scrollbars \
    --user-data-dir="$work/profile" --log-net-log="$work/net.json" \
    --window-size="$size" --screenshot="$out" "file://$report" \
    >"$work/chromium.log" 2>&1 || {
    cat "$work/chromium.log" >&2
    echo "report-screenshot: chromium failed" >&2
    exit 1
}

python3 - "$work/net.json" "$report" "$out" <<'EOF'
import json, re, struct, sys, zlib

net_log, page, shot = sys.argv[1:]

# The network requests the page made: URL requests whose network isolation key is the file://
# page's (Chromium's own background requests, e.g. update checks, have another key).
with open(net_log) as f:
    text = f.read()
try:
    log = json.loads(text)
except ValueError:  # a NetLog cut short by the exit lacks its closing brackets
    log = json.loads(text.rstrip().rstrip(",") + "]}")
start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
requested = sorted({
    e["params"]["url"] for e in log["events"]
    if e["type"] == start_job and e["params"].get("network_isolation_key", "").startswith("file://")
})
# File loads do not pass the network stack: the page's own references to anything but inline data.
with open(page, encoding="utf-8") as f:
    html = f.read()
references = sorted({
    m.group(2) for m in re.finditer(r"""(?:\b(?:src|href|poster|action)\s*=\s*|url\()\s*(["']?)([^"')\s>]+)\1""", html, re.I)
    if not m.group(2).startswith(("data:", "#"))
})
foreign = sorted(set(requested) | set(references))

# The screenshot's pixels: PNG chunks, inflated, rows unfiltered (8-bit RGB or RGBA).
with open(shot, "rb") as f:
    png = f.read()
assert png[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
pos, idat = 8, b""
while pos < len(png):
    length, kind = struct.unpack(">I4s", png[pos:pos + 8])
    body = png[pos + 8:pos + 8 + length]
    if kind == b"IHDR":
        width, height, depth, colour = struct.unpack(">IIBB", body[:10])
    elif kind == b"IDAT":
        idat += body
    pos += 12 + length
assert depth == 8 and colour in (2, 6), f"unexpected PNG format (depth {depth}, colour type {colour})"
bpp = 3 if colour == 2 else 4
raw, stride = zlib.decompress(idat), width * bpp
prev, colours, white = bytearray(stride), set(), 0
for y in range(height):
    kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
    for i in range(stride):
        a = line[i - bpp] if i >= bpp else 0
        b, c = prev[i], prev[i - bpp] if i >= bpp else 0
        if kind == 1: line[i] = (line[i] + a) & 255
        elif kind == 2: line[i] = (line[i] + b) & 255
        elif kind == 3: line[i] = (line[i] + (a + b) // 2) & 255
        elif kind == 4:
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
    for x in range(0, stride, bpp * 4):  # every 4th pixel is enough to judge
        px = bytes(line[x:x + 3])
        colours.add(px)
        white += px == b"\xff\xff\xff"
    prev = line
sampled = height * len(range(0, stride, bpp * 4))
inked = 1 - white / sampled

print(f"report-screenshot: {shot} ({width}x{height}), {len(colours)} colours, {inked:.1%} of the page not white")
print(f"report-screenshot: requests by the page: {', '.join(requested) or 'none'}; references: {', '.join(references) or 'none'}")
failed = False
if foreign:
    print(f"report-screenshot: FAILED: the page loaded other resources: {', '.join(foreign)}")
    failed = True
if len(colours) < 2 or inked < 0.01:
    print("report-screenshot: FAILED: the screenshot is blank")
    failed = True
sys.exit(1 if failed else 0)
EOF
