-- Argo CD health of a gpupool.dev VideoJob: Succeeded is Healthy, Failed is Degraded,
-- anything else (Pending, Scheduled, Running, no status yet) is Progressing.
local hs = {}
local st = obj.status
if st == nil or st.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator"
  return hs
end
if st.phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = "Succeeded"
elseif st.phase == "Failed" then
  hs.status = "Degraded"
  hs.message = st.error or "Failed"
else
  hs.status = "Progressing"
  hs.message = st.phase
end
return hs
