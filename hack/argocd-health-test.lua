-- Runs the Argo CD health checks of deploy/gitops/health/ on sample objects, the way Argo CD
-- does: the object is the global `obj`, the script returns {status, message}.
--   lua hack/argocd-health-test.lua deploy/gitops/health
-- The scripts stay within Lua 5.1 (Argo CD embeds gopher-lua), so any 5.x interpreter works.
local dir = arg[1] or "deploy/gitops/health"
local failures, checks = 0, 0

local function check(script, object, want, message)
  obj = object
  local ok, hs = pcall(dofile, dir .. "/" .. script)
  checks = checks + 1
  if not ok then
    failures = failures + 1
    print("FAIL " .. script .. ": error " .. tostring(hs))
  elseif type(hs) ~= "table" or hs.status ~= want or type(hs.message) ~= "string" then
    failures = failures + 1
    print(string.format("FAIL %s: %s: got %s (%s), want %s", script, message,
      tostring(hs and hs.status), tostring(hs and hs.message), want))
  else
    print(string.format("ok   %s: %s -> %s (%s)", script, message, hs.status, hs.message))
  end
end

local function cond(type_, status, msg)
  return { type = type_, status = status, reason = "Test", message = msg }
end

-- VideoJob
check("videojob.lua", { spec = {} }, "Progressing", "no status yet")
check("videojob.lua", { status = {} }, "Progressing", "empty status")
for _, p in ipairs({ "Pending", "Scheduled", "Running" }) do
  check("videojob.lua", { status = { phase = p } }, "Progressing", p)
end
check("videojob.lua", { status = { phase = "Succeeded", output = { ok = true } } }, "Healthy", "Succeeded")
check("videojob.lua", { status = { phase = "Failed", error = "worker answered 400" } }, "Degraded", "Failed")

-- GpuInstance
check("gpuinstance.lua", { spec = { pool = "default" } }, "Progressing", "no status yet")
for _, p in ipairs({ "Pending", "Provisioning", "Terminating" }) do
  check("gpuinstance.lua", { status = { phase = p } }, "Progressing", p)
end
check("gpuinstance.lua", { status = { phase = "Ready" } }, "Healthy", "Ready")
check("gpuinstance.lua", { status = { phase = "Failed" } }, "Degraded", "Failed without conditions")
check("gpuinstance.lua",
  { status = { phase = "Failed", conditions = { cond("Ready", "False", "no capacity") } } },
  "Degraded", "Failed with a condition")

-- GpuPool
check("gpupool.lua", { spec = {} }, "Progressing", "no status yet")
check("gpupool.lua", { status = { conditions = {} } }, "Progressing", "no conditions")
check("gpupool.lua", { status = { conditions = { cond("ProvidersAvailable", "True", "x") } } },
  "Progressing", "no Ready condition")
check("gpupool.lua", { status = { conditions = { cond("Ready", "Unknown", "starting") } } },
  "Progressing", "Ready Unknown")
check("gpupool.lua", { status = { conditions = { cond("SpendLimited", "False", "x"), cond("Ready", "True", "2 instances") } } },
  "Healthy", "Ready True")
check("gpupool.lua", { status = { conditions = { cond("Ready", "False", "Secret vast not found") } } },
  "Degraded", "Ready False")

print(string.format("%d checks, %d failures", checks, failures))
os.exit(failures == 0 and 0 or 1)
