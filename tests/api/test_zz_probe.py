import httpx, json
from tests.factories import create_event

async def test_probe(api: httpx.AsyncClient) -> None:
    ev = await create_event(api)
    base = {"name": "x", "starts_at": "2027-06-12T19:30:00+02:00", "total_tickets": 5}
    cases = {
        "surrogate_value": b'{"name": "\\ud800", "starts_at": "2027-06-12T19:30:00+02:00", "total_tickets": 5}',
        "surrogate_key": b'{"\\ud800": 1, "name": "x", "starts_at": "2027-06-12T19:30:00+02:00", "total_tickets": 5}',
        "surrogate_in_date": b'{"name": "x", "starts_at": "\\ud800", "total_tickets": 5}',
        "year1_plus14": json.dumps(base | {"starts_at": "0001-01-01T00:00:00+14:00"}).encode(),
        "year9999_minus14": json.dumps(base | {"starts_at": "9999-12-31T23:59:59-14:00"}).encode(),
        "bigint": b'{"name": "x", "starts_at": "2027-06-12T19:30:00+02:00", "total_tickets": ' + b"9"*5000 + b"}",
        "1e400": b'{"name": "x", "starts_at": "2027-06-12T19:30:00+02:00", "total_tickets": 1e400}',
        "nan": b'{"name": "x", "starts_at": "2027-06-12T19:30:00+02:00", "total_tickets": NaN}',
        "array": b'[1,2]',
        "null": b'null',
        "str": b'"hi"',
        "empty": b'',
        "bad_utf8": b'{"name": "\xff", "starts_at": "2027-06-12T19:30:00+02:00", "total_tickets": 5}',
        "bom": b'\xef\xbb\xbf{"name": "x", "starts_at": "2027-06-12T19:30:00+02:00", "total_tickets": 5}',
        "nested": b'[' * 100000 + b']' * 100000,
        "dup_keys": b'{"name": "x", "name": "y", "starts_at": "2027-06-12T19:30:00+02:00", "total_tickets": 5}',
        "date_only": json.dumps(base | {"starts_at": "2027-06-12"}).encode(),
        "date_int": json.dumps(base | {"starts_at": 1700000000}).encode(),
        "date_Z": json.dumps(base | {"starts_at": "2027-06-12T19:30:00Z"}).encode(),
    }
    for name, raw in cases.items():
        r = await api.post("/events", content=raw, headers={"content-type": "application/json"})
        print(name, r.status_code, r.headers.get("content-type"), r.text[:300])
    def gen():
        for _ in range(70):
            yield b"x" * 1024
    r = await api.post("/events", content=gen(), headers={"content-type": "application/json"})
    print("chunked", r.status_code, r.headers.get("content-type"), r.text[:300])
    r = await api.post("/events", content=b"x" * 70000, headers={"content-type": "application/json"})
    print("big", r.status_code, r.headers.get("content-type"), r.text[:300])
    r = await api.post("/events")
    print("nobody", r.status_code, r.headers.get("content-type"), r.text[:300])
    r = await api.post("/events", content=b"{}", headers={"content-type": "text/plain"})
    print("text", r.status_code, r.headers.get("content-type"), r.text[:300])
    r = await api.post("/events", data={"a": "b"})
    print("form", r.status_code, r.headers.get("content-type"), r.text[:300])
    r = await api.put("/events")
    print("put", r.status_code, r.headers, r.text[:300])
    r = await api.get("/nope")
    print("404", r.status_code, r.headers.get("content-type"), r.text[:300])
    r = await api.options(f"/events/{ev['id']}/tickets/purchase", headers={"Origin": "https://shop.example", "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type,idempotency-key"})
    print("preflight", r.status_code, r.headers, r.text[:300])
    r = await api.get(f"/events/{ev['id']}", headers={"Origin": "https://shop.example"})
    print("cors get", r.headers)
    for p in ["/events/abc", "/events/%00", "/events/" + "a"*5000, "/purchases/abc", "/events/%ED%A0%80"]:
        r = await api.get(p)
        print(p[:30], r.status_code, r.text[:300])
    for k in ["", "a"*256, "\x07", "é", " a "]:
        try:
            r = await api.post(f"/events/{ev['id']}/tickets/purchase", json={"customer_id": "c", "quantity": 1}, headers={"Idempotency-Key": k})
            print(repr(k[:5]), r.status_code, r.text[:300])
        except Exception as e:
            print(repr(k[:5]), "client error", e)
    r = await api.post(f"/events/{ev['id']}/tickets/purchase", content=b'{"customer_id": "c", "quantity": 1}', headers={"content-type":"application/json", "Idempotency-Key": b"\xff\xfe"})
    print("latin1 key", r.status_code, r.text[:300])
    r = await api.get("/events", params={"cursor": "!!!"})
    print("cursor", r.status_code, r.text[:300])
    for c in ["W1tdXQ", "WzEsMl0", "bnVsbA", "WyJ4IiwieSJd", "WyIyMDI3LTAxLTAxVDAwOjAwOjAwIiwiMDAwMDAwMDAtMDAwMC0wMDAwLTAwMDAtMDAwMDAwMDAwMDAwIl0"]:
        r = await api.get("/events", params={"cursor": c})
        print("cursor", c, r.status_code, r.text[:200])
    r = await api.patch(f"/events/{ev['id']}", json={"name": None})
    print("patch null", r.status_code, r.text[:200])
    r = await api.patch(f"/events/{ev['id']}", json={})
    print("patch empty", r.status_code, r.text[:200])
    r = await api.patch(f"/events/{ev['id']}", json={"venue": "v"}, headers={"If-Match": "abc"})
    print("patch ifmatch abc", r.status_code, r.text[:200])
