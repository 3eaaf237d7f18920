-- Argo CD health check for mailflow.dev OutboundConnector and MultiSmtpProfile (one script,
-- both kinds). It reads what the operator writes, as Flux's kstatus does:
--   * status.observedGeneration behind metadata.generation: the operator has not looked at
--     this spec yet                                             -> Progressing
--   * Accepted=False (invalid, Conflicted) or ResolvedRefs=False (a missing profile or
--     Secret): nothing will change until someone fixes the spec -> Degraded
--   * Ready=True: accepted, references resolve, every ready relay serves it -> Healthy
--   * anything else (relays still loading the new generation)   -> Progressing
-- Written for Argo CD's Lua (5.1, no standard os/io); tested by tests/helm/test_argocd_health.py
-- with the cases of health_test.yaml.
local hs = {}

local function condition(conditions, kind)
  if conditions == nil then
    return nil
  end
  for _, c in ipairs(conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function describe(c)
  local text = c.type .. "=" .. tostring(c.status)
  if c.reason ~= nil and c.reason ~= "" then
    text = text .. " (" .. c.reason .. ")"
  end
  if c.message ~= nil and c.message ~= "" then
    text = text .. ": " .. c.message
  end
  return text
end

local status = obj.status
local generation = obj.metadata.generation
if status == nil or status.conditions == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the Mailflow operator to report status"
  return hs
end
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the Mailflow operator to observe generation " .. tostring(generation)
  return hs
end

for _, kind in ipairs({"Accepted", "ResolvedRefs"}) do
  local c = condition(status.conditions, kind)
  if c ~= nil and c.status == "False" then
    hs.status = "Degraded"
    hs.message = describe(c)
    return hs
  end
end

local ready = condition(status.conditions, "Ready")
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = ready.message or "Ready"
  return hs
end

hs.status = "Progressing"
local programmed = condition(status.conditions, "Programmed")
if programmed ~= nil and programmed.status ~= "True" then
  hs.message = describe(programmed)
elseif ready ~= nil then
  hs.message = describe(ready)
else
  hs.message = "Waiting for the Ready condition"
end
return hs
