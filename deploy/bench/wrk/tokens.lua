-- wrk script of make bench's Synapse step (deploy/local/bench.sh): GET
-- BENCH_PATH with the access tokens of BENCH_TOKENS_FILE (one a line), each
-- connection starting at a random token and taking the next one for every
-- request, so that every user's whoami is asked alike.
local path = os.getenv("BENCH_PATH") or "/_matrix/client/v3/account/whoami"
local requests = {}
local next_one = 0
function init(args)
  -- Built here, not when the script loads: wrk.host and wrk.port are set
  -- only now, and wrk.format adds no Host header of its own.
  local host = wrk.host .. ":" .. wrk.port
  for line in io.lines(os.getenv("BENCH_TOKENS_FILE")) do
    if line ~= "" then
      requests[#requests + 1] = wrk.format("GET", path, {
        ["Host"] = host,
        ["Authorization"] = "Bearer " .. line,
        ["User-Agent"] = "Element/1.11.0 (wrk; make bench)",
      })
    end
  end
  next_one = math.random(#requests) - 1
end
function request()
  next_one = next_one % #requests + 1
  return requests[next_one]
end
