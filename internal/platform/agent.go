package platform

import "slices"

// Agent statuses. The platform sets them: busy while the agent runs a
// command, idle otherwise, error after its last command failed, disabled
// when a user disabled it (it then refuses commands).
const (
	AgentIdle     = "idle"
	AgentBusy     = "busy"
	AgentError    = "error"
	AgentDisabled = "disabled"
)

// Agent is what commands are dispatched to (the seed's Agent). It is also
// a principal: it can hold API keys.
type Agent struct {
	Base
	Name          string     `db:"name" json:"name"`
	Description   string     `db:"description" json:"description"`
	Status        string     `db:"status" json:"status" enum:"idle,busy,error,disabled" doc:"Set by the platform; follows the agent's commands."`
	EnvironmentID *string    `db:"environment_id" json:"environment_id,omitempty" format:"uuid" doc:"The environment whose variables and secrets its commands see."`
	TemplateID    *string    `db:"template_id" json:"template_id,omitempty" format:"uuid" doc:"The template the agent was made from."`
	Overrides     JSONObject `db:"overrides" json:"overrides" doc:"The agent's own parameters, merged over its template's."`
	Config        JSONObject `db:"config" json:"config" doc:"The resolved parameters: the template chain, then the overrides."`
}

// MaxConcurrency is how many commands the agent runs at once (config
// max_concurrency, default 1).
func (a *Agent) MaxConcurrency() int {
	if n, ok := a.Config["max_concurrency"].(float64); ok && n >= 1 {
		return int(n)
	}
	return 1
}

// Allows reports whether the agent's config lets it run task: its
// allowed_tasks name it, or there is no such list.
func (a *Agent) Allows(task string) bool {
	allowed, ok := a.Config["allowed_tasks"].([]any)
	return !ok || slices.Contains(allowed, any(task))
}

// CommandTimeoutS is the timeout, in seconds, of the agent's commands that
// set none: its config's command_timeout_s, else def.
func (a *Agent) CommandTimeoutS(def int) int {
	if n, ok := a.Config["command_timeout_s"].(float64); ok && n >= 1 {
		return int(n)
	}
	return def
}

// Environment is a named set of variables and write-only secrets that the
// commands of agents using it see.
type Environment struct {
	Base
	Name        string     `db:"name" json:"name"`
	Description string     `db:"description" json:"description"`
	TemplateID  *string    `db:"template_id" json:"template_id,omitempty" format:"uuid"`
	Overrides   JSONObject `db:"overrides" json:"overrides" doc:"The environment's own parameters, merged over its template's."`
	Params      JSONObject `db:"params" json:"params" doc:"The resolved parameters: {\"variables\": {NAME: value}}."`
	Secrets     JSONObject `db:"secrets" json:"secrets" doc:"Secret names; values are write-only and always shown as ***."`
}

// Variables returns the environment's resolved variables.
func (e *Environment) Variables() map[string]string {
	out := map[string]string{}
	if vars, ok := e.Params["variables"].(map[string]any); ok {
		for k, v := range vars {
			if s, ok := v.(string); ok {
				out[k] = s
			}
		}
	}
	return out
}
