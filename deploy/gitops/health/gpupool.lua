-- Argo CD health of a gpupool.dev GpuPool: its Ready condition True is Healthy, False is
-- Degraded; no Ready condition yet (or Unknown) is Progressing.
local hs = {}
hs.status = "Progressing"
hs.message = "Waiting for the Ready condition"
if obj.status ~= nil and obj.status.conditions ~= nil then
  for _, c in ipairs(obj.status.conditions) do
    if c.type == "Ready" then
      if c.status == "True" then
        hs.status = "Healthy"
      elseif c.status == "False" then
        hs.status = "Degraded"
      end
      hs.message = c.message or c.reason or hs.message
    end
  end
end
return hs
