-- wrk script: a different pre-minted token on every request (the worst case for a token cache).
--
--   wrk ... -s bench/fresh_tokens.lua URL -- TOKEN_FILE FIRST COUNT
--
-- TOKEN_FILE holds one token per line. This run sends lines FIRST+1 .. FIRST+COUNT in order, as
-- "Authorization: Bearer <token>", and starts over at FIRST+1 only if it needs more than COUNT
-- (bench/run.py counts the requests and says so in its report). The requests are formatted once, in
-- init(), so that wrk spends no time on them while it measures.

local requests = {}
local next_request = 1

function init(args)
  local path, first, count = args[1], tonumber(args[2]), tonumber(args[3])
  local line_number = 0
  for token in io.lines(path) do
    line_number = line_number + 1
    if line_number > first then
      requests[#requests + 1] = wrk.format(nil, nil, { Authorization = "Bearer " .. token })
      if #requests == count then
        break
      end
    end
  end
  if #requests == 0 then
    error("fresh_tokens.lua: no tokens in " .. path .. " after line " .. first)
  end
end

function request()
  local r = requests[next_request]
  next_request = next_request % #requests + 1
  return r
end
