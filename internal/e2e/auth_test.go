package e2e

// Accounts end to end: registration, login, refresh, logout, the caller's
// account, API keys, and the first superadmin.

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestAuthRegisterValidation(t *testing.T) {
	t.Parallel()
	s := NewStack(t, nil)
	c := s.Client(s.API())
	ada := c.NewUser("ada")
	register := func(email, password, name string) *Response {
		return c.Do("POST", "/v1/auth/register", map[string]any{"email": email, "password": password, "name": name})
	}
	for _, tc := range []struct {
		what, email, password, name string
		fields                      []string
	}{
		{"bad email", "not-an-email", "long enough password", "X", []string{"body.email"}},
		{"email with spaces inside", "a b@example.com", "long enough password", "X", []string{"body.email"}},
		{"email with a display name", "X <x@example.com>", "long enough password", "X", []string{"body.email"}},
		{"short password", "short@example.com", "1234567", "X", []string{"body.password"}},
		{"password is the email", "same@example.com", "same@example.com", "X", []string{"body.password"}},
		{"password is the email in another case", "same@example.com", "SAME@Example.com", "X", []string{"body.password"}},
		{"every field bad", "nope", "x", " ", []string{"body.email", "body.password", "body.name"}},
	} {
		r := register(tc.email, tc.password, tc.name)
		secExpect(t, tc.what, r, 400)
		if got := secFields(t, r); !slices.Equal(got, tc.fields) {
			t.Fatalf("%s: want fields %v, got %v: %s", tc.what, tc.fields, got, r.Body)
		}
		if r.Header.Get("Content-Type") != "application/problem+json" {
			t.Fatalf("%s: Content-Type %q", tc.what, r.Header.Get("Content-Type"))
		}
	}
	secExpect(t, "a missing body", c.Do("POST", "/v1/auth/register", nil), 400)
	secExpect(t, "a body that is not JSON", c.Do("POST", "/v1/auth/register", "{"), 400)

	for _, email := range []string{ada.Email, strings.ToUpper(ada.Email)} {
		r := register(email, "another long password", "Impostor")
		secExpect(t, "duplicate email "+email, r, 409)
		for _, leak := range []string{ada.ID, ada.Org, "ada", "created_at", "default_org_id"} {
			if strings.Contains(strings.ToLower(string(r.Body)), strings.ToLower(leak)) {
				t.Fatalf("the conflict reveals %q: %s", leak, r.Body)
			}
		}
	}
	// The original account is intact.
	secLogin(t, c, ada.Email, ada.Password)
	secExpect(t, "the impostor's password", c.Do("POST", "/v1/auth/login", map[string]any{"email": ada.Email, "password": "another long password"}), 401)
}

func TestAuthSessionsAndKeys(t *testing.T) {
	t.Parallel()
	s := NewStack(t, nil)
	c := s.Client(s.API())
	ada := c.NewUser("ada")

	secStep(t, "login", func() {
		r := c.Must(200, "POST", "/v1/auth/login", map[string]any{"email": ada.Email, "password": ada.Password})
		body := r.JSON(t)
		if body["token_type"] != "Bearer" || body["expires_in"] != float64(900) || r.Header.Get("Cache-Control") != "no-store" {
			t.Fatalf("login: %v %s", r.Header, r.Body)
		}
		if !strings.HasPrefix(body["refresh_token"].(string), "agr_") || strings.Count(body["access_token"].(string), ".") != 2 {
			t.Fatalf("tokens: %s", r.Body)
		}
		unknown := c.Do("POST", "/v1/auth/login", map[string]any{"email": "nobody@example.com", "password": ada.Password})
		wrong := c.Do("POST", "/v1/auth/login", map[string]any{"email": ada.Email, "password": "wrong password"})
		secExpect(t, "unknown email", unknown, 401)
		secExpect(t, "wrong password", wrong, 401)
		if unknown.Str(t, "detail") != wrong.Str(t, "detail") {
			t.Fatalf("an unknown email and a wrong password answer differently: %s / %s", unknown.Body, wrong.Body)
		}
		// Email case and surrounding spaces do not matter.
		secLogin(t, c, " "+strings.ToUpper(ada.Email)+" ", ada.Password)
	})

	secStep(t, "a long non-ASCII User-Agent", func() {
		// Cut to 256 bytes inside its "é", it made every audit row and
		// session of the request fail: logins answered 400, and an
		// admin's actions went unaudited.
		ua := strings.Repeat("a", 255) + "é"
		r := c.Must(200, "POST", "/v1/auth/login", map[string]any{"email": ada.Email, "password": ada.Password}, "User-Agent", ua)
		in := ada.As(r.Str(t, "access_token"), ada.Org)
		key := in.Must(201, "POST", "/v1/api-keys", map[string]any{"name": "long agent", "permissions": []string{"Agent.read"}}, "User-Agent", ua).JSON(t)["api_key"].(map[string]any)["id"]
		events := in.Must(200, "GET", "/v1/audit?action=api_key.create&page_size=100", nil).JSON(t)["items"].([]any)
		found := false
		for _, e := range events {
			e := e.(map[string]any)
			if e["resource_id"] == key {
				found = e["user_agent"] == strings.Repeat("a", 255)
			}
		}
		if !found {
			t.Fatalf("the key's creation is not audited with its cut User-Agent: %q", events)
		}
	})

	secStep(t, "me", func() {
		me := ada.Must(200, "GET", "/v1/users/me", nil).JSON(t)
		if me["id"] != ada.ID || me["email"] != ada.Email || me["name"] != "ada" || me["is_superadmin"] != false || me["default_org_id"] != ada.Org {
			t.Fatalf("me: %v", me)
		}
		ms, _ := me["memberships"].([]any)
		if len(ms) != 1 || ms[0].(map[string]any)["org_id"] != ada.Org || ms[0].(map[string]any)["role"] != "owner" {
			t.Fatalf("memberships: %v", me["memberships"])
		}
		renamed := ada.Must(200, "PATCH", "/v1/users/me", map[string]any{"name": "Ada Lovelace"}).JSON(t)
		if renamed["name"] != "Ada Lovelace" {
			t.Fatalf("rename: %v", renamed)
		}
		secExpect(t, "blank name", ada.Do("PATCH", "/v1/users/me", map[string]any{"name": ""}), 400)
		secExpect(t, "me without credentials", c.Do("GET", "/v1/users/me", nil), 401)
	})

	secStep(t, "refresh", func() {
		access, refresh := secLogin(t, c, ada.Email, ada.Password)
		r := c.Must(200, "POST", "/v1/auth/refresh", map[string]any{"refresh_token": refresh})
		next := ada.As(r.Str(t, "access_token"), ada.Org)
		next.Must(200, "GET", "/v1/users/me", nil)
		ada.As(access, ada.Org).Must(200, "GET", "/v1/users/me", nil) // the session lives on
		c.Must(200, "POST", "/v1/auth/refresh", map[string]any{"refresh_token": r.Str(t, "refresh_token")})
		secExpect(t, "refresh with a token that is not one", c.Do("POST", "/v1/auth/refresh", map[string]any{"refresh_token": "abc"}), 401)
		secExpect(t, "refresh with nothing", c.Do("POST", "/v1/auth/refresh", map[string]any{"refresh_token": ""}), 401)
	})

	secStep(t, "logout", func() {
		access, refresh := secLogin(t, c, ada.Email, ada.Password)
		me := ada.As(access, ada.Org)
		me.Must(204, "POST", "/v1/auth/logout", nil)
		Eventually(t, time.Second, "the access token is refused", func() bool { return me.Do("GET", "/v1/users/me", nil).Status == 401 })
		secExpect(t, "refresh after logout", c.Do("POST", "/v1/auth/refresh", map[string]any{"refresh_token": refresh}), 401)
		secExpect(t, "logout again", me.Do("POST", "/v1/auth/logout", nil), 401)
		ada.Must(200, "GET", "/v1/users/me", nil) // other sessions live on
	})

	secStep(t, "API keys", func() {
		r := ada.Must(201, "POST", "/v1/api-keys", map[string]any{"name": "ci", "permissions": []string{"Agent.read", "Agent.create"}})
		if r.Header.Get("Cache-Control") != "no-store" {
			t.Fatalf("the key's answer may be cached: %v", r.Header)
		}
		var created struct {
			Key    string         `json:"key"`
			APIKey map[string]any `json:"api_key"`
		}
		if err := json.Unmarshal(r.Body, &created); err != nil {
			t.Fatal(err)
		}
		prefix, _ := created.APIKey["prefix"].(string)
		id, _ := created.APIKey["id"].(string)
		if !strings.HasPrefix(created.Key, prefix+"_") || len(created.Key) < len(prefix)+40 || created.APIKey["entity_id"] != ada.ID {
			t.Fatalf("created: %s", r.Body)
		}
		secretPart := created.Key[len(prefix)+1:]
		for _, path := range []string{"/v1/api-keys", "/v1/api-keys/" + id} {
			body := string(ada.Must(200, "GET", path, nil).Body)
			if !strings.Contains(body, prefix) || strings.Contains(body, secretPart) || strings.Contains(body, "secret_hash") {
				t.Fatalf("%s: want the prefix and never the secret: %s", path, body)
			}
		}
		withKey := ada.As(created.Key, "")
		agent := withKey.Must(201, "POST", "/v1/agents", map[string]any{"name": "made by a key"}).JSON(t)
		if agent["owner_id"] != ada.ID || agent["org_id"] != ada.Org {
			t.Fatalf("a key's agent: %v", agent)
		}
		me := withKey.Must(200, "GET", "/v1/users/me", nil).JSON(t)
		if me["id"] != ada.ID {
			t.Fatalf("me through the key: %v", me)
		}
		Eventually(t, 2*time.Second, "last_used_at is recorded", func() bool {
			return ada.Must(200, "GET", "/v1/api-keys/"+id, nil).JSON(t)["last_used_at"] != nil
		})
		expired := ada.Do("POST", "/v1/api-keys", map[string]any{"name": "old", "expires_at": time.Now().Add(-time.Hour).Format(time.RFC3339)})
		secExpect(t, "a key that would be expired", expired, 400)
		revoked := ada.Must(200, "POST", "/v1/api-keys/"+id+"/revoke", nil).JSON(t)
		if revoked["revoked_at"] == nil {
			t.Fatalf("revoke: %v", revoked)
		}
		Eventually(t, time.Second, "the revoked key is refused", func() bool { return withKey.Do("GET", "/v1/agents", nil).Status == 401 })
	})
}

// runAPI runs the api binary once with the stack's settings and extra ones.
func runAPI(t *testing.T, s *Stack, env map[string]string, args ...string) (string, error) {
	t.Helper()
	cmd := exec.Command(filepath.Join(binDir, "api"), args...)
	cmd.Dir = t.TempDir()
	cmd.Env = os.Environ()
	for k, v := range s.Env {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	for k, v := range env {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	out, err := cmd.Output()
	return string(out), err
}

func TestAuthSeedAdmin(t *testing.T) {
	t.Parallel()
	s := NewStack(t, nil)
	admin := map[string]string{"AGENTRY_ADMIN_EMAIL": "root-" + fmt.Sprint(time.Now().UnixNano()) + "@example.com", "AGENTRY_ADMIN_PASSWORD": "a long admin password"}

	if out, err := runAPI(t, s, map[string]string{"AGENTRY_ADMIN_EMAIL": admin["AGENTRY_ADMIN_EMAIL"], "AGENTRY_ADMIN_PASSWORD": "short"}, "seed-admin"); err == nil {
		t.Fatalf("seed-admin with a short password succeeded: %s", out)
	}
	out, err := runAPI(t, s, admin, "seed-admin")
	if err != nil || !strings.Contains(out, "created superadmin "+admin["AGENTRY_ADMIN_EMAIL"]) || strings.Contains(out, admin["AGENTRY_ADMIN_PASSWORD"]) {
		t.Fatalf("seed-admin: %v: %q", err, out)
	}
	out, err = runAPI(t, s, admin, "seed-admin")
	if err != nil || !strings.Contains(out, "already exists") {
		t.Fatalf("seed-admin again: %v: %q", err, out)
	}

	c := s.Client(s.API())
	ada := c.NewUser("ada")
	secExpect(t, "a user lists users", ada.Do("GET", "/v1/users", nil), 403)
	access, _ := secLogin(t, c, admin["AGENTRY_ADMIN_EMAIL"], admin["AGENTRY_ADMIN_PASSWORD"])
	root := c.As(access, "")
	me := root.Must(200, "GET", "/v1/users/me", nil).JSON(t)
	if me["is_superadmin"] != true {
		t.Fatalf("the seeded admin: %v", me)
	}
	users := root.Must(200, "GET", "/v1/users?page_size=100", nil).JSON(t)
	if users["total"] != float64(2) {
		t.Fatalf("users: %v", users)
	}
	found := root.Must(200, "GET", "/v1/users?email="+strings.Split(ada.Email, "@")[0], nil).JSON(t)
	if items, _ := found["items"].([]any); len(items) != 1 || items[0].(map[string]any)["id"] != ada.ID {
		t.Fatalf("users by email: %v", found)
	}
	root.Must(200, "GET", "/v1/users/"+ada.ID, nil)
	// The superadmin reaches into any organization.
	agent := secCreate(t, ada.Client, "/v1/agents", map[string]any{"name": "ada's"})
	root.As(access, ada.Org).Must(200, "GET", "/v1/agents/"+agent, nil)
	// Disabling a user ends their sessions at once, and for good.
	_, refresh := secLogin(t, c, ada.Email, ada.Password)
	root.Must(200, "PATCH", "/v1/users/"+ada.ID, map[string]any{"disabled": true})
	Eventually(t, time.Second, "the disabled user's token is refused", func() bool { return ada.Do("GET", "/v1/users/me", nil).Status == 401 })
	secExpect(t, "the disabled user logs in", c.Do("POST", "/v1/auth/login", map[string]any{"email": ada.Email, "password": ada.Password}), 401)
	root.Must(200, "PATCH", "/v1/users/"+ada.ID, map[string]any{"disabled": false})
	secExpect(t, "a refresh token of before the disabling, once enabled again", c.Do("POST", "/v1/auth/refresh", map[string]any{"refresh_token": refresh}), 401)
	secLogin(t, c, ada.Email, ada.Password)
	secExpect(t, "the superadmin disables itself", root.Do("PATCH", "/v1/users/"+me["id"].(string), map[string]any{"disabled": true}), 409)
	// A superadmin's key narrower than * is not a superadmin.
	key := root.Must(201, "POST", "/v1/api-keys", map[string]any{"name": "narrow", "permissions": []string{"Agent.read"}}).Str(t, "key")
	secExpect(t, "a narrow key of the superadmin lists users", root.As(key, "").Do("GET", "/v1/users", nil), 403)
	secExpect(t, "a narrow key of the superadmin reads another organization's agent", root.As(key, "").Do("GET", "/v1/agents/"+agent, nil), 404)

	// An organization may lower its limit of commands in flight; only a
	// superadmin raises it above the platform's (100 by default).
	adaOrg := "/v1/organizations/" + ada.Org
	adaAccess, _ := secLogin(t, c, ada.Email, ada.Password)
	adaIn := c.As(adaAccess, ada.Org)
	if got := adaIn.Must(200, "PATCH", adaOrg, map[string]any{"org_max_in_flight": 50}).JSON(t)["org_max_in_flight"]; got != float64(50) {
		t.Fatalf("lowered limit: %v", got)
	}
	secExpect(t, "an owner raises her organization's limit", adaIn.Do("PATCH", adaOrg, map[string]any{"org_max_in_flight": 100000}), 403)
	root.As(access, ada.Org).Must(200, "PATCH", adaOrg, map[string]any{"org_max_in_flight": 1000})
	adaIn.Must(200, "PATCH", adaOrg, map[string]any{"org_max_in_flight": 500}) // lowered from what she was let have
	secExpect(t, "an owner raises her organization's limit back", adaIn.Do("PATCH", adaOrg, map[string]any{"org_max_in_flight": 1000}), 403)
	// A superadmin lowering the limit while the owner sets one below the
	// old: the owner's is judged against the limit as it is when written.
	rootIn := root.As(access, ada.Org)
	for round := range 8 {
		rootIn.Must(200, "PATCH", adaOrg, map[string]any{"org_max_in_flight": 500})
		lowered, set := atOnce(
			func() *Response { return rootIn.Do("PATCH", adaOrg, map[string]any{"org_max_in_flight": 50}) },
			func() *Response { return adaIn.Do("PATCH", adaOrg, map[string]any{"org_max_in_flight": 450}) })
		final := rootIn.Must(200, "GET", adaOrg, nil).JSON(t)["org_max_in_flight"]
		if lowered.Status == 200 && set.Status == 200 && final == 450.0 {
			t.Fatalf("round %d: the owner's 450 overrode the superadmin's 50", round)
		}
	}

	// Two superadmins demoting each other at the same moment: one stays.
	bob := c.NewUser("bob")
	root.Must(200, "PATCH", "/v1/users/"+bob.ID, map[string]any{"is_superadmin": true})
	byRoot, byBob := atOnce(
		func() *Response { return root.Do("PATCH", "/v1/users/"+bob.ID, map[string]any{"is_superadmin": false}) },
		func() *Response {
			return bob.As(bob.Token, "").Do("PATCH", "/v1/users/"+me["id"].(string), map[string]any{"is_superadmin": false})
		})
	if byRoot.Status == 200 && byBob.Status == 200 {
		t.Fatalf("two superadmins demoted each other: the platform has none")
	}
}

func TestAPIShutsDownPromptly(t *testing.T) {
	t.Parallel()
	s := NewStack(t, map[string]string{"AGENTRY_SHUTDOWN_TIMEOUT": "5s"})
	api := s.API()
	s.Client(api).NewUser("ada")
	start := time.Now()
	if err := api.Stop(); err != nil {
		t.Fatalf("stop: %v\n%s", err, api.Logs())
	}
	if took := time.Since(start); took > 8*time.Second {
		t.Fatalf("the api took %s to stop on SIGTERM (shutdown timeout 5s)", took.Round(time.Second))
	}
}

func TestAuthUserWithoutOrganization(t *testing.T) {
	t.Parallel()
	s := NewStack(t, nil)
	c := s.Client(s.API())
	ada := c.NewUser("ada")
	ada.Must(204, "DELETE", "/v1/organizations/"+ada.Org, nil)
	secExpect(t, "acting in the deleted organization", ada.Do("GET", "/v1/agents", nil), 403)
	homeless := ada.As(ada.Token, "")
	me := homeless.Must(200, "GET", "/v1/users/me", nil).JSON(t)
	if me["default_org_id"] != nil || len(me["memberships"].([]any)) != 0 {
		t.Fatalf("me: %v", me)
	}
	// Told how to name an organization, not answered an empty list or a
	// vague denial.
	for _, req := range []struct{ method, path string }{{"POST", "/v1/agents"}, {"GET", "/v1/agents"}, {"GET", "/v1/commands"}} {
		r := homeless.Do(req.method, req.path, map[string]any{"name": "x"})
		if r.Status != 403 || !strings.Contains(string(r.Body), "X-Org-ID") {
			t.Errorf("%s %s in no organization: want 403 naming X-Org-ID, got %d: %s", req.method, req.path, r.Status, r.Body)
		}
	}
	org := homeless.Must(201, "POST", "/v1/organizations", map[string]any{"name": "new home"}).Str(t, "id")
	ada.As(ada.Token, org).Must(201, "POST", "/v1/agents", map[string]any{"name": "x"})
}

// A user removed from their default organization acts in none until they
// choose another: they were refused every call without X-Org-ID, even the
// one that changes their default.
func TestAuthRemovedFromDefaultOrganization(t *testing.T) {
	t.Parallel()
	s := NewStack(t, nil)
	c := s.Client(s.API())
	ada, bob := c.NewUser("ada"), c.NewUser("bob")
	_, membership := secInvite(t, ada, bob, "member")
	bobHome := bob.As(bob.Token, "")
	bobHome.Must(200, "PATCH", "/v1/users/me", map[string]any{"default_org_id": ada.Org})
	ada.Must(204, "DELETE", "/v1/members/"+membership, nil)
	Eventually(t, 5*time.Second, "bob's default organization dropped", func() bool {
		r := bobHome.Do("GET", "/v1/users/me", nil)
		return r.Status == 200
	})
	if r := bobHome.Do("GET", "/v1/agents", nil); r.Status != 403 || !strings.Contains(string(r.Body), "X-Org-ID") {
		t.Fatalf("in no organization: want 403 naming X-Org-ID, got %d: %s", r.Status, r.Body)
	}
	bobHome.Must(200, "PATCH", "/v1/users/me", map[string]any{"default_org_id": bob.Org})
	bobHome.Must(200, "GET", "/v1/agents", nil)
	secExpect(t, "bob in ada's organization", bob.As(bob.Token, ada.Org).Do("GET", "/v1/agents", nil), 403)
}

// A removed member's API keys do not come back with a new invitation.
func TestAuthRemovedMembersKeysStayRevoked(t *testing.T) {
	t.Parallel()
	s := NewStack(t, nil)
	c := s.Client(s.API())
	ada, bob := c.NewUser("ada"), c.NewUser("bob")
	bobIn, membership := secInvite(t, ada, bob, "member")
	agent := secCreate(t, bobIn, "/v1/agents", map[string]any{"name": "bob's"})
	key := c.As(bobIn.Must(201, "POST", "/v1/api-keys", map[string]any{"name": "ci", "permissions": []string{"Agent.read"}}).Str(t, "key"), "")
	agentKey := c.As(bobIn.Must(201, "POST", "/v1/api-keys", map[string]any{"name": "bot", "agent_id": agent, "permissions": []string{"Agent.read"}}).Str(t, "key"), "")
	key.Must(200, "GET", "/v1/agents", nil)
	agentKey.Must(200, "GET", "/v1/agents/"+agent, nil)
	ada.Must(204, "DELETE", "/v1/members/"+membership, nil)
	secInvite(t, ada, bob, "member")
	for name, k := range map[string]*Client{"bob's key": key, "bob's agent's key": agentKey} {
		if st := k.Do("GET", "/v1/agents", nil).Status; st != 401 {
			t.Errorf("%s after bob was removed and invited again: want 401, got %d", name, st)
		}
	}
}

// Two owners removing each other at the same moment: one of them stays
// (each counted two owners and both went, leaving the organization none).
func TestOwnersRemovingEachOtherKeepOne(t *testing.T) {
	t.Parallel()
	s := NewStack(t, nil)
	c := s.Client(s.API())
	for round := range 6 {
		ada, bob := c.NewUser("ada"), c.NewUser("bob")
		bobIn, bobMembership := secInvite(t, ada, bob, "owner")
		adaMembership := ownMembership(t, ada)
		byAda, byBob := atOnce(
			func() *Response { return ada.Do("DELETE", "/v1/members/"+bobMembership, nil) },
			func() *Response { return bobIn.Do("DELETE", "/v1/members/"+adaMembership, nil) })
		if byAda.Status == 204 && byBob.Status == 204 {
			t.Fatalf("round %d: both owners removed each other: the organization has no owner", round)
		}
		for _, r := range []*Response{byAda, byBob} {
			if r.Status != 204 && r.Status != 409 && r.Status != 403 {
				t.Fatalf("round %d: want 204, or 409/403 for the second, got %d: %s", round, r.Status, r.Body)
			}
		}
	}
}

// Anyone may leave an organization they were added to, but not its last
// owner.
func TestAuthLeaveOrganization(t *testing.T) {
	t.Parallel()
	s := NewStack(t, nil)
	c := s.Client(s.API())
	ada, bob := c.NewUser("ada"), c.NewUser("bob")
	bobIn, _ := secInvite(t, ada, bob, "member")
	key := c.As(bobIn.Must(201, "POST", "/v1/api-keys", map[string]any{"name": "ci", "permissions": []string{"Agent.read"}}).Str(t, "key"), "")
	leave := "/v1/organizations/" + ada.Org + "/leave"
	secExpect(t, "leaving with an API key", key.Do("POST", leave, nil), 403)
	bob.Must(204, "POST", leave, nil)
	secExpect(t, "bob in the organization he left", bobIn.Do("GET", "/v1/agents", nil), 403)
	secExpect(t, "bob's key of the organization he left", key.Do("GET", "/v1/agents", nil), 401)
	secExpect(t, "leaving again", bob.Do("POST", leave, nil), 404)
	secExpect(t, "the last owner leaving", ada.Do("POST", leave, nil), 409)
	ada.Must(200, "GET", "/v1/agents", nil)
}

// An owner leaving while another removes them: one of the two ends the
// membership, the other is told so; neither waits on the other forever or
// fails (the two locked the membership and the organization in opposite
// orders, and PostgreSQL broke the deadlock with a 500).
func TestLeavingWhileRemoved(t *testing.T) {
	t.Parallel()
	s := NewStack(t, nil)
	c := s.Client(s.API())
	for round := range 10 {
		ada, bob := c.NewUser("ada"), c.NewUser("bob")
		_, membership := secInvite(t, ada, bob, "owner")
		removed, left := atOnce(
			func() *Response { return ada.Do("DELETE", "/v1/members/"+membership, nil) },
			func() *Response { return bob.Do("POST", "/v1/organizations/"+ada.Org+"/leave", nil) })
		if removed.Status >= 500 || left.Status >= 500 || removed.Status/100 == 2 && left.Status/100 == 2 {
			t.Fatalf("round %d: removed %d %s, left %d %s", round, removed.Status, removed.Body, left.Status, left.Body)
		}
		if removed.Status/100 != 2 && left.Status/100 != 2 {
			t.Fatalf("round %d: neither ended the membership: removed %d %s, left %d %s", round, removed.Status, removed.Body, left.Status, left.Body)
		}
	}
}

// Keys a member makes while being removed do not outlive the membership:
// made after the removal revoked the member's keys, they worked again when
// the member was invited back.
func TestKeysMadeWhileRemovedStayRevoked(t *testing.T) {
	t.Parallel()
	s := NewStack(t, nil)
	c := s.Client(s.API())
	for round := range 8 {
		ada, bob := c.NewUser("ada"), c.NewUser("bob")
		bobIn, membership := secInvite(t, ada, bob, "member")
		var wg sync.WaitGroup
		var mu sync.Mutex
		var keys []string
		for range 6 {
			wg.Go(func() {
				if r := bobIn.Do("POST", "/v1/api-keys", map[string]any{"name": "k", "permissions": []string{"Agent.read"}}); r.Status == 201 {
					mu.Lock()
					keys = append(keys, r.Str(t, "key"))
					mu.Unlock()
				}
			})
		}
		wg.Go(func() { ada.Must(204, "DELETE", "/v1/members/"+membership, nil) })
		wg.Wait()
		secInvite(t, ada, bob, "member")
		for _, k := range keys {
			if st := c.As(k, "").Do("GET", "/v1/agents", nil).Status; st != 401 {
				t.Fatalf("round %d: a key made while bob was removed works after he was invited back: %d", round, st)
			}
		}
	}
}

// Two owners demoting each other at once, a third owner keeping the
// organization owned: the second to act is no longer an owner and is
// refused (both succeeded, each judged by the role it had when its request
// began).
func TestOwnersDemotingEachOther(t *testing.T) {
	t.Parallel()
	s := NewStack(t, nil)
	c := s.Client(s.API())
	for round := range 8 {
		ada, bob, cy := c.NewUser("ada"), c.NewUser("bob"), c.NewUser("cy")
		bobIn, bobMembership := secInvite(t, ada, bob, "owner")
		secInvite(t, ada, cy, "owner")
		adaMembership := ownMembership(t, ada)
		byAda, byBob := atOnce(
			func() *Response {
				return ada.Do("PATCH", "/v1/members/"+bobMembership, map[string]any{"role": "admin"})
			},
			func() *Response {
				return bobIn.Do("PATCH", "/v1/members/"+adaMembership, map[string]any{"role": "admin"})
			})
		if byAda.Status == 200 && byBob.Status == 200 {
			t.Fatalf("round %d: two owners demoted each other", round)
		}
		if byAda.Status >= 500 || byBob.Status >= 500 {
			t.Fatalf("round %d: %d %s / %d %s", round, byAda.Status, byAda.Body, byBob.Status, byBob.Body)
		}
	}
}

// atOnce sends two requests at the same moment and returns their answers.
func atOnce(a, b func() *Response) (*Response, *Response) {
	var ra, rb *Response
	var wg sync.WaitGroup
	wg.Go(func() { ra = a() })
	wg.Go(func() { rb = b() })
	wg.Wait()
	return ra, rb
}

// ownMembership returns the id of u's membership of their own organization.
func ownMembership(t *testing.T, u *User) string {
	t.Helper()
	items := u.Must(200, "GET", "/v1/members?user_id="+u.ID, nil).JSON(t)["items"].([]any)
	return items[0].(map[string]any)["id"].(string)
}
