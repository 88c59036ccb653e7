-- Argo CD health of a gpupool.dev GpuInstance: Ready is Healthy, Failed is Degraded,
-- Pending, Provisioning and Terminating (or no status yet) are Progressing.
local hs = {}
local st = obj.status
local phase = st and st.phase
if phase == "Ready" then
  hs.status = "Healthy"
  hs.message = "Ready"
elseif phase == "Failed" then
  hs.status = "Degraded"
  hs.message = "Failed"
  if st.conditions ~= nil then
    for _, c in ipairs(st.conditions) do
      if c.status == "False" and c.message ~= nil then
        hs.message = c.message
      end
    end
  end
else
  hs.status = "Progressing"
  hs.message = phase or "Waiting for the operator"
end
return hs
