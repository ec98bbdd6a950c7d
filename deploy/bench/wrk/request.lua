-- wrk script of make bench (deploy/local/bench.sh): one GET with a bearer
-- token, built once (no request() function, so wrk sends pre-built bytes).
--   BENCH_PATH   request path (default: whoami)
--   BENCH_TOKEN  access token (default: tok-1)
wrk.method = "GET"
wrk.path = os.getenv("BENCH_PATH") or "/_matrix/client/v3/account/whoami"
wrk.headers["Authorization"] = "Bearer " .. (os.getenv("BENCH_TOKEN") or "tok-1")
wrk.headers["User-Agent"] = "Element/1.11.0 (wrk; make bench)"
