package e2e

// The OWASP API Security Top 10 (2023), items 1 to 5, through the real
// server: broken object level authorization, broken authentication, broken
// object property level authorization, unrestricted resource consumption
// and broken function level authorization.

import (
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/google/uuid"
)

// secJWTSecret is the JWT secret of the stacks that forge tokens.
const secJWTSecret = "owasp-test-jwt-secret-at-least-32-characters"

// secFields returns the fields a problem answer names.
func secFields(t *testing.T, r *Response) []string {
	t.Helper()
	var p struct {
		Errors []struct {
			Field string `json:"field"`
		} `json:"errors"`
	}
	if err := json.Unmarshal(r.Body, &p); err != nil {
		t.Fatalf("not a problem (%d): %s", r.Status, r.Body)
	}
	out := make([]string, len(p.Errors))
	for i, e := range p.Errors {
		out[i] = e.Field
	}
	return out
}

// secExpect fails unless r has status want.
func secExpect(t *testing.T, what string, r *Response, want int) {
	t.Helper()
	if r.Status != want {
		t.Fatalf("%s: want %d, got %d: %s", what, want, r.Status, r.Body)
	}
}

// secInvite makes member a member of admin's organization with role, and
// returns member's client acting there and the membership id.
func secInvite(t *testing.T, admin, member *User, role string) (*Client, string) {
	t.Helper()
	r := admin.Must(201, "POST", "/v1/members", map[string]any{"email": member.Email, "role": role})
	return member.As(member.Token, admin.Org), r.Str(t, "id")
}

// secCreate creates a resource and returns its id.
func secCreate(t *testing.T, c *Client, path string, body map[string]any) string {
	t.Helper()
	return c.Must(201, "POST", path, body).Str(t, "id")
}

// secListIDs returns the ids of the first page of a list (100 items).
func secListIDs(t *testing.T, c *Client, path string) []string {
	t.Helper()
	sep := "?"
	if strings.Contains(path, "?") {
		sep = "&"
	}
	r := c.Must(200, "GET", path+sep+"page_size=100", nil)
	var page struct {
		Items []struct {
			ID string `json:"id"`
		} `json:"items"`
	}
	if err := json.Unmarshal(r.Body, &page); err != nil {
		t.Fatal(err)
	}
	ids := make([]string, len(page.Items))
	for i, it := range page.Items {
		ids[i] = it.ID
	}
	return ids
}

// secAudit returns the organization's denied audit events, as the admin sees them.
func secAudit(t *testing.T, admin *Client, query string) []map[string]any {
	t.Helper()
	r := admin.Must(200, "GET", "/v1/audit?page_size=100&"+query, nil)
	var page struct {
		Items []map[string]any `json:"items"`
	}
	if err := json.Unmarshal(r.Body, &page); err != nil {
		t.Fatal(err)
	}
	return page.Items
}

// secHasAudit reports whether events hold one by actor with action and outcome.
func secHasAudit(events []map[string]any, actor, action, outcome string) bool {
	for _, e := range events {
		if e["actor_id"] == actor && e["action"] == action && e["outcome"] == outcome {
			return true
		}
	}
	return false
}

// secResources creates an agent, a template and an environment as u and
// returns their paths.
func secResources(t *testing.T, u *User) []string {
	t.Helper()
	tpl := secCreate(t, u.Client, "/v1/templates", map[string]any{"kind": "agent", "name": "base", "params": map[string]any{"max_concurrency": 2}})
	env := secCreate(t, u.Client, "/v1/environments", map[string]any{"name": "prod", "params": map[string]any{"variables": map[string]any{"REGION": "eu"}}})
	agent := secCreate(t, u.Client, "/v1/agents", map[string]any{"name": "worker", "template_id": tpl, "environment_id": env})
	return []string{"/v1/agents/" + agent, "/v1/templates/" + tpl, "/v1/environments/" + env}
}

// secStep runs one step of a scenario. The steps of a scenario share its
// stack and its clients, which fail the scenario's test, so they are not
// subtests.
func secStep(t *testing.T, name string, step func()) {
	t.Helper()
	t.Logf("step: %s", name)
	step()
}

// collection returns "/v1/agents" of "/v1/agents/{id}".
func collection(path string) string { return path[:strings.LastIndex(path, "/")] }

func TestOWASPAPI1BrokenObjectLevelAuthorization(t *testing.T) {
	t.Parallel()
	s := NewStack(t, nil)
	c := s.Client(s.API())
	alice, bob := c.NewUser("alice"), c.NewUser("bob")
	paths := secResources(t, alice)

	secStep(t, "another organization", func() {
		for _, path := range paths {
			// A body each type accepts, so that only access decides.
			valid := map[string]any{"name": "mine now"}
			if strings.HasPrefix(path, "/v1/templates/") {
				valid["kind"] = "agent"
			}
			grant := map[string]any{"principal_id": bob.ID, "action": "*", "effect": "allow"}
			for _, req := range []struct {
				method, path string
				body         any
			}{
				{"GET", path, nil},
				{"PATCH", path, valid},
				{"PUT", path, valid},
				{"DELETE", path, nil},
				{"GET", path + "/acl", nil},
				{"POST", path + "/acl", grant},
			} {
				secExpect(t, "bob "+req.method+" "+req.path, bob.Do(req.method, req.path, req.body), 404)
			}
			id := path[strings.LastIndex(path, "/")+1:]
			if ids := secListIDs(t, bob.Client, collection(path)); slices.Contains(ids, id) {
				t.Fatalf("bob lists %s", path)
			}
			if strings.HasPrefix(path, "/v1/agents/") && slices.Contains(secListIDs(t, bob.Client, "/v1/agents?owner_id="+alice.ID), id) {
				t.Fatalf("bob lists %s filtering by its owner", path)
			}
			// Clearing the collection in his own organization does not reach it.
			bob.Must(200, "DELETE", collection(path), nil)
			alice.Must(200, "GET", path, nil)
		}
		// Naming alice's organization is refused outright.
		bobInAlice := bob.As(bob.Token, alice.Org)
		for _, path := range paths {
			secExpect(t, "bob with X-Org-ID of alice's organization", bobInAlice.Do("GET", path, nil), 403)
		}
		secExpect(t, "bob lists with X-Org-ID of alice's organization", bobInAlice.Do("GET", "/v1/agents", nil), 403)
		secExpect(t, "bob reads alice's organization", bob.Do("GET", "/v1/organizations/"+alice.Org, nil), 404)
		// A resource of alice's organization cannot be referenced from bob's.
		r := bob.Do("POST", "/v1/agents", map[string]any{"name": "thief", "environment_id": paths[2][len("/v1/environments/"):]})
		secExpect(t, "bob uses alice's environment", r, 400)
		r = bob.Do("POST", "/v1/agents", map[string]any{"name": "thief", "template_id": paths[1][len("/v1/templates/"):]})
		secExpect(t, "bob uses alice's template", r, 400)
		secExpect(t, "bob instantiates alice's template", bob.Do("POST", paths[1]+"/instantiate", map[string]any{"name": "thief"}), 404)
	})

	secStep(t, "same organization, read but no write", func() {
		carol := c.NewUser("carol")
		carolInAlice, _ := secInvite(t, alice, carol, "viewer")
		for _, path := range paths {
			carolInAlice.Must(200, "GET", path, nil)
			secExpect(t, "viewer PATCH "+path, carolInAlice.Do("PATCH", path, map[string]any{"name": "renamed"}), 403)
			secExpect(t, "viewer DELETE "+path, carolInAlice.Do("DELETE", path, nil), 403)
			secExpect(t, "viewer GET "+path+"/acl", carolInAlice.Do("GET", path+"/acl", nil), 403)
			secExpect(t, "viewer POST "+path+"/acl", carolInAlice.Do("POST", path+"/acl", map[string]any{"principal_id": carol.ID, "action": "*", "effect": "allow"}), 403)
		}
		events := secAudit(t, alice.Client, "outcome=denied")
		if !secHasAudit(events, carol.ID, "Agent.update", "denied") || !secHasAudit(events, carol.ID, "Agent.delete", "denied") || !secHasAudit(events, carol.ID, "acl.grant", "denied") {
			t.Fatalf("the viewer's denials are not in the audit log: %v", events)
		}
		// A type-wide deny takes effect at once, cached rows or not, and
		// so does its revocation.
		agent := paths[0]
		carolInAlice.Must(200, "GET", agent, nil)
		entry := alice.Must(201, "POST", "/v1/acl", map[string]any{"resource_type": "Agent", "principal_id": carol.ID, "action": "read", "effect": "deny"}).Str(t, "id")
		Eventually(t, time.Second, "the type-wide deny applies", func() bool { return carolInAlice.Do("GET", agent, nil).Status == 404 })
		if ids := secListIDs(t, carolInAlice, "/v1/agents"); len(ids) != 0 {
			t.Fatalf("the denied viewer lists agents: %v", ids)
		}
		carolInAlice.Must(200, "GET", paths[1], nil)
		alice.Must(204, "DELETE", "/v1/acl/"+entry, nil)
		Eventually(t, time.Second, "the revoked deny no longer applies", func() bool { return carolInAlice.Do("GET", agent, nil).Status == 200 })
	})

	secStep(t, "same organization, no permission on agents", func() {
		alice.Must(201, "POST", "/v1/roles", map[string]any{"name": "template-reader", "permissions": []string{"Template.read"}})
		dave := c.NewUser("dave")
		daveInAlice, _ := secInvite(t, alice, dave, "template-reader")
		agent, template := paths[0], paths[1]
		for _, req := range []struct{ method, path string }{{"GET", agent}, {"PATCH", agent}, {"DELETE", agent}, {"GET", agent + "/acl"}} {
			secExpect(t, "dave "+req.method+" "+req.path, daveInAlice.Do(req.method, req.path, map[string]any{"name": "x"}), 404)
		}
		r := daveInAlice.Must(200, "GET", "/v1/agents", nil).JSON(t)
		if total, _ := r["total"].(float64); total != 0 || len(r["items"].([]any)) != 0 {
			t.Fatalf("dave lists agents: %v", r)
		}
		daveInAlice.Must(200, "GET", template, nil)
		secExpect(t, "dave PATCH the template", daveInAlice.Do("PATCH", template, map[string]any{"name": "x"}), 403)
		events := secAudit(t, alice.Client, "outcome=denied&actor_id="+dave.ID)
		if !secHasAudit(events, dave.ID, "Agent.read", "denied") || !secHasAudit(events, dave.ID, "Template.update", "denied") {
			t.Fatalf("dave's denials are not in the audit log: %v", events)
		}
	})

	secStep(t, "a deny entry beats ownership", func() {
		erin := c.NewUser("erin")
		erinInAlice, _ := secInvite(t, alice, erin, "member")
		own := "/v1/agents/" + secCreate(t, erinInAlice, "/v1/agents", map[string]any{"name": "erins"})
		erinInAlice.Must(200, "GET", own, nil)
		// Erin may not write agents by role (members read, create and
		// command), but as the owner she may.
		erinInAlice.Must(200, "PATCH", own, map[string]any{"description": "mine"})
		r := alice.Must(201, "POST", own+"/acl", map[string]any{"principal_id": erin.ID, "action": "update", "effect": "deny"})
		entry := r.Str(t, "id")
		secExpect(t, "owner denied update", erinInAlice.Do("PATCH", own, map[string]any{"description": "still mine?"}), 403)
		alice.Must(201, "POST", own+"/acl", map[string]any{"principal_id": erin.ID, "action": "*", "effect": "deny"})
		secExpect(t, "owner denied everything reads", erinInAlice.Do("GET", own, nil), 404)
		if slices.Contains(secListIDs(t, erinInAlice, "/v1/agents"), own[len("/v1/agents/"):]) {
			t.Fatal("the denied owner lists the agent")
		}
		secExpect(t, "owner denied everything deletes", erinInAlice.Do("DELETE", own, nil), 404)
		alice.Must(204, "DELETE", own+"/acl/"+entry, nil)
		events := secAudit(t, alice.Client, "outcome=denied&actor_id="+erin.ID)
		if !secHasAudit(events, erin.ID, "Agent.update", "denied") || !secHasAudit(events, erin.ID, "Agent.read", "denied") {
			t.Fatalf("erin's denials are not in the audit log: %v", events)
		}
	})

	secStep(t, "X-Org-ID in another spelling", func() {
		frank := c.NewUser("frank")
		frankInAlice, _ := secInvite(t, alice, frank, "member")
		alice.Must(201, "POST", "/v1/acl", map[string]any{"resource_type": "Agent", "principal_id": frank.ID, "action": "create", "effect": "deny"})
		secExpect(t, "frank creates despite the deny", frankInAlice.Do("POST", "/v1/agents", map[string]any{"name": "f"}), 403)
		upper := frank.As(frank.Token, strings.ToUpper(alice.Org))
		secExpect(t, "frank creates with X-Org-ID in upper case", upper.Do("POST", "/v1/agents", map[string]any{"name": "f"}), 403)
	})
}

func TestOWASPAPI1AdminKeepsControlOfACL(t *testing.T) {
	t.Parallel()
	s := NewStack(t, nil)
	c := s.Client(s.API())
	alice := c.NewUser("alice")
	agent := "/v1/agents/" + secCreate(t, alice.Client, "/v1/agents", map[string]any{"name": "a"})
	// The owner denies the whole organization (herself included) everything.
	entry := alice.Must(201, "POST", agent+"/acl", map[string]any{"principal_id": alice.Org, "action": "*", "effect": "deny"}).Str(t, "id")
	secExpect(t, "read under the deny", alice.Do("GET", agent, nil), 404)
	// DESIGN.md: the owner and the organization's admins may edit a
	// resource's ACL, whether or not they may read the resource: else the
	// deny entry could never be revoked but by a superadmin.
	alice.Must(200, "GET", agent+"/acl", nil)
	alice.Must(204, "DELETE", agent+"/acl/"+entry, nil)
	alice.Must(200, "GET", agent, nil)
}

func TestOWASPAPI1DemotedAdminKeepsNoPower(t *testing.T) {
	t.Parallel()
	s := NewStack(t, nil)
	c := s.Client(s.API())
	alice, mallory, accomplice := c.NewUser("alice"), c.NewUser("mallory"), c.NewUser("accomplice")
	malloryIn, malloryMembership := secInvite(t, alice, mallory, "admin")
	// As an admin, mallory invites an accomplice and writes a role.
	r := malloryIn.Must(201, "POST", "/v1/members", map[string]any{"email": accomplice.Email, "role": "viewer"})
	accompliceMembership := r.Str(t, "id")
	role := malloryIn.Must(201, "POST", "/v1/roles", map[string]any{"name": "readers", "permissions": []string{"Agent.read"}}).Str(t, "id")
	// Alice demotes her.
	alice.Must(200, "PATCH", "/v1/members/"+malloryMembership, map[string]any{"role": "member"})
	Eventually(t, 2*time.Second, "mallory is a member", func() bool {
		return malloryIn.Do("GET", "/v1/audit", nil).Status == 403
	})
	// Memberships and roles belong to the organization, not to the admin
	// who made them: ownership gives mallory nothing.
	secExpect(t, "the demoted admin promotes her accomplice", malloryIn.Do("PATCH", "/v1/members/"+accompliceMembership, map[string]any{"role": "admin"}), 403)
	secExpect(t, "the demoted admin widens her role", malloryIn.Do("PATCH", "/v1/roles/"+role, map[string]any{"permissions": []string{"*"}}), 403)
	secExpect(t, "the demoted admin removes her accomplice", malloryIn.Do("DELETE", "/v1/members/"+accompliceMembership, nil), 403)
}

// Nobody grants more than they hold: a custom role that manages roles or
// memberships cannot widen itself or hand out admin; an agent's key made
// by an admin dies with the admin's membership; a deny on a resource's
// owner is not the owner's to see or lift.
func TestOWASPAPI5NoOneGrantsMoreThanTheyHold(t *testing.T) {
	t.Parallel()
	s := NewStack(t, nil)
	c := s.Client(s.API())
	alice, esc, mm, adm, mem := c.NewUser("alice"), c.NewUser("esc"), c.NewUser("mm"), c.NewUser("adm"), c.NewUser("mem")
	rolemgr := alice.Must(201, "POST", "/v1/roles", map[string]any{"name": "rolemgr", "permissions": []string{"Role.*", "Agent.read"}}).Str(t, "id")
	alice.Must(201, "POST", "/v1/roles", map[string]any{"name": "membermgr", "permissions": []string{"Membership.*"}})
	escIn, _ := secInvite(t, alice, esc, "rolemgr")
	mmIn, mmMembership := secInvite(t, alice, mm, "membermgr")
	secExpect(t, "a role manager widens its own role", escIn.Do("PATCH", "/v1/roles/"+rolemgr, map[string]any{"permissions": []string{"*"}}), 403)
	secExpect(t, "a role manager makes an all-powerful role", escIn.Do("POST", "/v1/roles", map[string]any{"name": "god", "permissions": []string{"*"}}), 403)
	escIn.Must(201, "POST", "/v1/roles", map[string]any{"name": "readers", "permissions": []string{"Agent.read"}})
	secExpect(t, "a membership manager makes itself admin", mmIn.Do("PATCH", "/v1/members/"+mmMembership, map[string]any{"role": "admin"}), 403)
	secExpect(t, "a membership manager invites an admin", mmIn.Do("POST", "/v1/members", map[string]any{"email": adm.Email, "role": "admin"}), 403)

	// An admin's agent key: admin powers while she is one, none after.
	admIn, admMembership := secInvite(t, alice, adm, "admin")
	agent := secCreate(t, admIn, "/v1/agents", map[string]any{"name": "adm-agent"})
	var created struct {
		Key string `json:"key"`
	}
	if err := json.Unmarshal(admIn.Must(201, "POST", "/v1/api-keys", map[string]any{"name": "agent", "agent_id": agent, "permissions": []string{"*"}}).Body, &created); err != nil {
		t.Fatal(err)
	}
	secExpect(t, "an agent's key without permissions", admIn.Do("POST", "/v1/api-keys", map[string]any{"name": "agent", "agent_id": agent}), 400)
	key := c.As(created.Key, "")
	key.Must(201, "POST", "/v1/roles", map[string]any{"name": "while-admin", "permissions": []string{"Agent.read"}})
	alice.Must(204, "DELETE", "/v1/members/"+admMembership, nil)
	Eventually(t, 5*time.Second, "the removed admin's agent key refused", func() bool {
		st := key.Do("POST", "/v1/roles", map[string]any{"name": "backdoor", "permissions": []string{"*"}}).Status
		return st == 401 || st == 403
	})
	if st := key.Do("POST", "/v1/members", map[string]any{"email": mem.Email, "role": "admin"}).Status; st != 401 && st != 403 {
		t.Fatalf("the removed admin's agent key invites an admin: want 401 or 403, got %d", st)
	}

	// A deny an admin put on a member's own agent binds the member.
	memIn, _ := secInvite(t, alice, mem, "member")
	mine := "/v1/agents/" + secCreate(t, memIn, "/v1/agents", map[string]any{"name": "mine"})
	deny := alice.Must(201, "POST", mine+"/acl", map[string]any{"principal_id": mem.ID, "action": "*", "effect": "deny"}).Str(t, "id")
	secExpect(t, "the denied owner lists the ACL", memIn.Do("GET", mine+"/acl", nil), 404)
	secExpect(t, "the denied owner lifts the deny", memIn.Do("DELETE", mine+"/acl/"+deny, nil), 404)
	secExpect(t, "the denied owner reads", memIn.Do("GET", mine, nil), 404)
	alice.Must(200, "GET", mine+"/acl", nil)

	// Lists of access refuse what they do not know, as every list does.
	for _, path := range []string{mine + "/acl?foo=1", "/v1/acl?foo=1", "/v1/audit?foo=1"} {
		secExpect(t, "GET "+path, alice.Do("GET", path, nil), 400)
	}
	alice.Must(200, "GET", "/v1/acl?resource_type=Agent", nil)
	alice.Must(200, "GET", "/v1/audit?outcome=denied&page_size=5", nil)
}

// secForge signs claims with method and key.
func secForge(t *testing.T, method jwt.SigningMethod, key any, claims jwt.MapClaims) string {
	t.Helper()
	tok, err := jwt.NewWithClaims(method, claims).SignedString(key)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// secClaims returns the claims of a token the server issued, unverified.
func secClaims(t *testing.T, token string) jwt.MapClaims {
	t.Helper()
	claims := jwt.MapClaims{}
	if _, _, err := jwt.NewParser().ParseUnverified(token, claims); err != nil {
		t.Fatal(err)
	}
	return claims
}

// secLogin logs u in again: a new session.
func secLogin(t *testing.T, c *Client, email, password string, headers ...string) (access, refresh string) {
	t.Helper()
	r := c.As("", "").Must(200, "POST", "/v1/auth/login", map[string]any{"email": email, "password": password}, headers...)
	return r.Str(t, "access_token"), r.Str(t, "refresh_token")
}

func TestOWASPAPI2BrokenAuthentication(t *testing.T) {
	t.Parallel()
	s := NewStack(t, map[string]string{"AGENTRY_JWT_SECRET": secJWTSecret})
	c := s.Client(s.API())
	ada := c.NewUser("ada")

	secStep(t, "forged tokens", func() {
		real := secClaims(t, ada.Token)
		with := func(edit func(jwt.MapClaims)) jwt.MapClaims {
			cl := jwt.MapClaims{}
			for k, v := range real {
				cl[k] = v
			}
			cl["iat"], cl["nbf"], cl["exp"] = time.Now().Unix(), time.Now().Unix(), time.Now().Add(5*time.Minute).Unix()
			edit(cl)
			return cl
		}
		key := []byte(secJWTSecret)
		// The forgery works when everything is right: the refusals below
		// are for the one thing each changes.
		ada.As(secForge(t, jwt.SigningMethodHS256, key, with(func(jwt.MapClaims) {})), ada.Org).Must(200, "GET", "/v1/users/me", nil)
		parts := strings.Split(ada.Token, ".")
		sig := []byte(parts[2])
		sig[3] ^= 1
		for _, tc := range []struct{ name, token string }{
			{"tampered signature", parts[0] + "." + parts[1] + "." + string(sig)},
			{"tampered payload", parts[0] + "." + strings.Split(secForge(t, jwt.SigningMethodHS256, []byte("x"), with(func(c jwt.MapClaims) { c["sub"] = uuid.NewString() })), ".")[1] + "." + parts[2]},
			{"expired", secForge(t, jwt.SigningMethodHS256, key, with(func(c jwt.MapClaims) {
				c["iat"], c["nbf"], c["exp"] = time.Now().Add(-time.Hour).Unix(), time.Now().Add(-time.Hour).Unix(), time.Now().Add(-time.Minute).Unix()
			}))},
			{"alg none", secForge(t, jwt.SigningMethodNone, jwt.UnsafeAllowNoneSignatureType, with(func(jwt.MapClaims) {}))},
			{"HS384", secForge(t, jwt.SigningMethodHS384, key, with(func(jwt.MapClaims) {}))},
			{"wrong audience", secForge(t, jwt.SigningMethodHS256, key, with(func(c jwt.MapClaims) { c["aud"] = []string{"another-api"} }))},
			{"wrong issuer", secForge(t, jwt.SigningMethodHS256, key, with(func(c jwt.MapClaims) { c["iss"] = "evil" }))},
			{"wrong secret", secForge(t, jwt.SigningMethodHS256, []byte("another-secret-of-at-least-32-characters"), with(func(jwt.MapClaims) {}))},
			{"no session", secForge(t, jwt.SigningMethodHS256, key, with(func(c jwt.MapClaims) { delete(c, "sid") }))},
			{"unknown session", secForge(t, jwt.SigningMethodHS256, key, with(func(c jwt.MapClaims) { c["sid"] = uuid.NewString() }))},
			{"old token version", secForge(t, jwt.SigningMethodHS256, key, with(func(c jwt.MapClaims) { c["ver"] = 0 }))},
			{"garbage", "garbage"},
		} {
			r := ada.As(tc.token, "").Do("GET", "/v1/users/me", nil)
			secExpect(t, tc.name, r, 401)
			if !strings.HasPrefix(r.Header.Get("WWW-Authenticate"), "Bearer") {
				t.Fatalf("%s: no WWW-Authenticate challenge: %v", tc.name, r.Header)
			}
		}
		secExpect(t, "no credentials", ada.As("", "").Do("GET", "/v1/agents", nil), 401)
	})

	secStep(t, "refresh rotation and reuse", func() {
		access1, refresh1 := secLogin(t, c, ada.Email, ada.Password)
		r := c.Must(200, "POST", "/v1/auth/refresh", map[string]any{"refresh_token": refresh1})
		access2, refresh2 := r.Str(t, "access_token"), r.Str(t, "refresh_token")
		if refresh2 == refresh1 || r.Header.Get("Cache-Control") != "no-store" {
			t.Fatalf("refresh: %v %s", r.Header, r.Body)
		}
		ada.As(access2, ada.Org).Must(200, "GET", "/v1/users/me", nil)
		secExpect(t, "reusing a rotated refresh token", c.Do("POST", "/v1/auth/refresh", map[string]any{"refresh_token": refresh1}), 401)
		secExpect(t, "the new refresh token after reuse", c.Do("POST", "/v1/auth/refresh", map[string]any{"refresh_token": refresh2}), 401)
		for _, tok := range []string{access1, access2} {
			Eventually(t, time.Second, "the family's access tokens are refused", func() bool {
				return ada.As(tok, ada.Org).Do("GET", "/v1/users/me", nil).Status == 401
			})
		}
		ada.Must(200, "GET", "/v1/users/me", nil) // another session lives on
	})

	secStep(t, "logout", func() {
		access, refresh := secLogin(t, c, ada.Email, ada.Password)
		me := ada.As(access, ada.Org)
		me.Must(200, "GET", "/v1/users/me", nil)
		me.Must(204, "POST", "/v1/auth/logout", nil)
		Eventually(t, time.Second, "the access token is refused after logout", func() bool {
			return me.Do("GET", "/v1/users/me", nil).Status == 401
		})
		secExpect(t, "refresh after logout", c.Do("POST", "/v1/auth/refresh", map[string]any{"refresh_token": refresh}), 401)
	})

	secStep(t, "password change revokes the other sessions", func() {
		bea := c.NewUser("bea")
		otherAccess, otherRefresh := secLogin(t, c, bea.Email, bea.Password)
		bea.Must(204, "POST", "/v1/users/me/password", map[string]any{"current_password": bea.Password, "new_password": "a brand new password"})
		Eventually(t, time.Second, "the other session's access token is refused", func() bool {
			return bea.As(otherAccess, bea.Org).Do("GET", "/v1/users/me", nil).Status == 401
		})
		secExpect(t, "the other session's refresh token", c.Do("POST", "/v1/auth/refresh", map[string]any{"refresh_token": otherRefresh}), 401)
		bea.Must(200, "GET", "/v1/users/me", nil)
		c.Must(200, "POST", "/v1/auth/refresh", map[string]any{"refresh_token": bea.Refresh})
		secExpect(t, "the old password", c.Do("POST", "/v1/auth/login", map[string]any{"email": bea.Email, "password": bea.Password}), 401)
		secLogin(t, c, bea.Email, "a brand new password")
	})

	secStep(t, "API keys", func() {
		agent := secCreate(t, ada.Client, "/v1/agents", map[string]any{"name": "keyed"})
		r := ada.Must(201, "POST", "/v1/api-keys", map[string]any{"name": "read-only", "permissions": []string{"Agent.read"}})
		key, keyID := r.Str(t, "key"), r.JSON(t)["api_key"].(map[string]any)["id"].(string)
		withKey := ada.As(key, "")
		withKey.Must(200, "GET", "/v1/agents/"+agent, nil)
		withKey.Must(200, "GET", "/v1/agents", nil)
		secExpect(t, "a read-only key creates an agent", withKey.Do("POST", "/v1/agents", map[string]any{"name": "x"}), 403)
		secExpect(t, "a read-only key deletes an agent", withKey.Do("DELETE", "/v1/agents/"+agent, nil), 403)
		secExpect(t, "a read-only key updates an agent", withKey.Do("PATCH", "/v1/agents/"+agent, map[string]any{"name": "x"}), 403)
		secExpect(t, "a read-only key clears agents", withKey.Do("DELETE", "/v1/agents", nil), 403)
		secExpect(t, "a read-only key grants on an agent", withKey.Do("POST", "/v1/agents/"+agent+"/acl", map[string]any{"principal_id": ada.ID, "action": "*", "effect": "allow"}), 403)
		secExpect(t, "a key creates a key", withKey.Do("POST", "/v1/api-keys", map[string]any{"name": "child"}), 403)
		full := ada.Must(201, "POST", "/v1/api-keys", map[string]any{"name": "full"}).Str(t, "key")
		secExpect(t, "a full key creates a key", ada.As(full, "").Do("POST", "/v1/api-keys", map[string]any{"name": "child"}), 403)
		secExpect(t, "a key with a malformed permission", ada.Do("POST", "/v1/api-keys", map[string]any{"name": "wide", "permissions": []string{"Nope.read", "bad"}}), 400)
		secExpect(t, "a key logs out", withKey.Do("POST", "/v1/auth/logout", nil), 400)
		ada.Must(200, "POST", "/v1/api-keys/"+keyID+"/revoke", nil)
		Eventually(t, time.Second, "the revoked key is refused", func() bool {
			return withKey.Do("GET", "/v1/agents", nil).Status == 401
		})
		secExpect(t, "a forged key with a real prefix", ada.As(key[:17]+strings.Repeat("A", 43), "").Do("GET", "/v1/agents", nil), 401)
		ada.Must(200, "GET", "/v1/agents/"+agent, nil)
	})
}

func TestOWASPAPI2LoginThrottling(t *testing.T) {
	t.Parallel()
	// The API believes X-Forwarded-For from 127.0.0.1: the tests speak
	// from several addresses through it.
	s := NewStack(t, map[string]string{"AGENTRY_TRUSTED_PROXIES": "127.0.0.1/32", "AGENTRY_LOGIN_MAX_FAILURES": "3"})
	c := s.Client(s.API())
	ada := c.NewUser("ada")
	anon := c.As("", "")
	login := func(email, password, ip string) *Response {
		return anon.Do("POST", "/v1/auth/login", map[string]any{"email": email, "password": password}, "X-Forwarded-For", ip)
	}
	for i := range 3 {
		secExpect(t, fmt.Sprintf("wrong password %d", i+1), login(ada.Email, "wrong password", "203.0.113.7"), 401)
	}
	for _, email := range []string{ada.Email, strings.ToUpper(ada.Email), " " + ada.Email + " "} {
		r := login(email, ada.Password, "203.0.113.7")
		secExpect(t, "the right password from the throttled address as "+strconv.Quote(email), r, 429)
		if wait, err := strconv.Atoi(r.Header.Get("Retry-After")); err != nil || wait < 1 || wait > 61 {
			t.Fatalf("Retry-After %q: want the seconds left of the 1m window", r.Header.Get("Retry-After"))
		}
	}
	secExpect(t, "the right password from another address", login(ada.Email, ada.Password, "198.51.100.9"), 200)
}

func TestOWASPAPI2SpoofedForwardedFor(t *testing.T) {
	t.Parallel()
	// No trusted proxy: X-Forwarded-For is the client's word and ignored.
	s := NewStack(t, map[string]string{"AGENTRY_LOGIN_MAX_FAILURES": "3", "AGENTRY_LOGIN_FAILURE_WINDOW": "2s"})
	c := s.Client(s.API())
	ada := c.NewUser("ada")
	anon := c.As("", "")
	for i := range 3 {
		secExpect(t, fmt.Sprintf("wrong password %d", i+1), anon.Do("POST", "/v1/auth/login", map[string]any{"email": ada.Email, "password": "wrong"}, "X-Forwarded-For", fmt.Sprintf("10.0.0.%d", i+1)), 401)
	}
	for _, h := range [][]string{{"X-Forwarded-For", "10.9.9.9"}, {"X-Real-IP", "10.9.9.9"}, {"X-Forwarded-For", "127.0.0.2, 10.9.9.9"}} {
		r := anon.Do("POST", "/v1/auth/login", map[string]any{"email": ada.Email, "password": ada.Password}, h...)
		secExpect(t, "the right password with a spoofed "+h[0], r, 429)
	}
	// The lock-out ends with its window.
	Eventually(t, 5*time.Second, "the lock-out ends", func() bool {
		return anon.Do("POST", "/v1/auth/login", map[string]any{"email": ada.Email, "password": ada.Password}).Status == 200
	})
}

func TestOWASPAPI3BrokenObjectPropertyLevelAuthorization(t *testing.T) {
	t.Parallel()
	s := NewStack(t, nil)
	c := s.Client(s.API())
	ada, bob := c.NewUser("ada"), c.NewUser("bob")
	agentID := secCreate(t, ada.Client, "/v1/agents", map[string]any{"name": "a"})
	agent := "/v1/agents/" + agentID
	before := ada.Must(200, "GET", agent, nil).JSON(t)
	server := map[string]any{
		"owner_id":   bob.ID,
		"org_id":     bob.Org,
		"status":     "disabled",
		"id":         uuid.NewString(),
		"version":    99,
		"created_at": "2000-01-01T00:00:00Z",
		"config":     map[string]any{"max_concurrency": 100},
	}

	secStep(t, "create", func() {
		for field, value := range server {
			r := ada.Do("POST", "/v1/agents", map[string]any{"name": "mass", field: value})
			secExpect(t, "create with "+field, r, 400)
			if !slices.Contains(secFields(t, r), "body."+field) {
				t.Fatalf("create with %s: the problem does not name it: %s", field, r.Body)
			}
		}
		if ids := secListIDs(t, ada.Client, "/v1/agents"); len(ids) != 1 {
			t.Fatalf("refused creates stored agents: %v", ids)
		}
		if ids := secListIDs(t, bob.Client, "/v1/agents"); len(ids) != 0 {
			t.Fatalf("bob's organization got agents: %v", ids)
		}
	})

	secStep(t, "update", func() {
		for field, value := range server {
			for _, method := range []string{"PATCH", "PUT"} {
				r := ada.Do(method, agent, map[string]any{"name": "a", field: value})
				secExpect(t, method+" with "+field, r, 400)
				if !slices.Contains(secFields(t, r), "body."+field) {
					t.Fatalf("%s with %s: the problem does not name it: %s", method, field, r.Body)
				}
			}
		}
		after := ada.Must(200, "GET", agent, nil).JSON(t)
		for _, field := range []string{"owner_id", "org_id", "status", "id", "version", "created_at", "updated_at", "config"} {
			if fmt.Sprint(after[field]) != fmt.Sprint(before[field]) {
				t.Fatalf("%s changed: %v → %v", field, before[field], after[field])
			}
		}
	})

	secStep(t, "accounts", func() {
		for _, extra := range []map[string]any{{"is_superadmin": true}, {"role": "admin"}, {"default_org_id": ada.Org}, {"disabled": false}} {
			body := map[string]any{"email": "mass-" + uuid.NewString() + "@example.com", "password": "long enough password", "name": "Mass"}
			for k, v := range extra {
				body[k] = v
			}
			r := c.Do("POST", "/v1/auth/register", body)
			secExpect(t, fmt.Sprintf("register with %v", extra), r, 400)
			secExpect(t, "login as the refused registration", c.Do("POST", "/v1/auth/login", map[string]any{"email": body["email"], "password": body["password"]}), 401)
		}
		for _, patch := range []map[string]any{{"is_superadmin": true}, {"email": "other@example.com"}, {"disabled": true}, {"token_version": 5}} {
			r := ada.Do("PATCH", "/v1/users/me", patch)
			secExpect(t, fmt.Sprintf("PATCH /v1/users/me %v", patch), r, 400)
		}
		me := ada.Must(200, "GET", "/v1/users/me", nil).JSON(t)
		if me["is_superadmin"] != false || me["email"] != ada.Email || me["disabled"] != false {
			t.Fatalf("me changed: %v", me)
		}
		secExpect(t, "default_org_id of another organization", ada.Do("PATCH", "/v1/users/me", map[string]any{"default_org_id": bob.Org}), 400)
		secExpect(t, "a member edits users", ada.Do("PATCH", "/v1/users/"+ada.ID, map[string]any{"is_superadmin": true}), 403)
	})

	secStep(t, "no secrets in answers", func() {
		r := ada.Must(201, "POST", "/v1/api-keys", map[string]any{"name": "k"})
		secret := r.Str(t, "key")
		if !strings.HasPrefix(secret, "agk_") {
			t.Fatalf("the create answer has no key: %s", r.Body)
		}
		keyID := r.JSON(t)["api_key"].(map[string]any)["id"].(string)
		env := secCreate(t, ada.Client, "/v1/environments", map[string]any{"name": "e", "secrets": map[string]any{"TOKEN": "env-secret-value-1234"}})
		// The part after the prefix (agk_ and 12 characters): the secret
		// may hold '_' itself, and a short tail after the last one (say
		// "ls") is in every answer.
		secretPart := secret[len("agk_")+12+1:]
		bodies := map[string][]byte{}
		for _, path := range []string{"/v1/users/me", "/v1/api-keys", "/v1/api-keys/" + keyID, "/v1/members", "/v1/audit?page_size=100", "/v1/environments/" + env, "/v1/environments", "/v1/organizations", "/v1/roles"} {
			bodies[path] = ada.Must(200, "GET", path, nil).Body
		}
		_, refresh := secLogin(t, c, ada.Email, ada.Password)
		bodies["refresh"] = c.Must(200, "POST", "/v1/auth/refresh", map[string]any{"refresh_token": refresh}).Body
		bodies["register"] = c.Must(201, "POST", "/v1/auth/register", map[string]any{"email": "fresh-" + uuid.NewString() + "@example.com", "password": "long enough password", "name": "F"}).Body
		for what, body := range bodies {
			for _, leak := range []string{"password_hash", "$argon2id$", "secret_hash", "token_version", secretPart, "env-secret-value-1234", refresh} {
				if strings.Contains(string(body), leak) {
					t.Fatalf("%s shows %q: %s", what, leak, body)
				}
			}
		}
	})
}

func TestOWASPAPI4UnrestrictedResourceConsumption(t *testing.T) {
	t.Parallel()
	s := NewStack(t, nil)
	c := s.Client(s.API())
	ada := c.NewUser("ada")
	agent := "/v1/agents/" + secCreate(t, ada.Client, "/v1/agents", map[string]any{"name": "a"})
	big := `{"name": "big", "description": "` + strings.Repeat("x", 1<<20) + `"}`
	for _, req := range []struct {
		client       *Client
		method, path string
	}{
		{ada.Client, "POST", "/v1/agents"},
		{ada.Client, "PATCH", agent},
		{ada.Client, "PUT", agent},
		{ada.Client, "POST", "/v1/templates"},
		{c, "POST", "/v1/auth/login"},
		{c, "POST", "/v1/auth/register"},
	} {
		secExpect(t, req.method+" "+req.path+" with a body over 1 MiB", req.client.Do(req.method, req.path, big), http.StatusRequestEntityTooLarge)
	}
	for _, q := range []string{"page_size=101", "page_size=0", "page_size=-1", "page=0", "page_size=1000000000000"} {
		for _, path := range []string{"/v1/agents", "/v1/templates", "/v1/members", "/v1/audit"} {
			secExpect(t, path+"?"+q, ada.Do("GET", path+"?"+q, nil), 400)
		}
	}
	ada.Must(200, "GET", "/v1/agents?page_size=100", nil)
}

func TestOWASPAPI5BrokenFunctionLevelAuthorization(t *testing.T) {
	t.Parallel()
	s := NewStack(t, nil)
	c := s.Client(s.API())
	owner, member, viewer, outsider := c.NewUser("owner"), c.NewUser("member"), c.NewUser("viewer"), c.NewUser("outsider")
	m, memberMembership := secInvite(t, owner, member, "member")
	v, _ := secInvite(t, owner, viewer, "viewer")
	agent := "/v1/agents/" + secCreate(t, owner.Client, "/v1/agents", map[string]any{"name": "a"})
	role := owner.Must(201, "POST", "/v1/roles", map[string]any{"name": "custom", "permissions": []string{"Agent.read"}}).Str(t, "id")

	for _, req := range []struct {
		what         string
		method, path string
		body         any
	}{
		{"invite", "POST", "/v1/members", map[string]any{"email": outsider.Email, "role": "admin"}},
		{"change a role", "PATCH", "/v1/members/" + memberMembership, map[string]any{"role": "admin"}},
		{"remove a member", "DELETE", "/v1/members/" + memberMembership, nil},
		{"read the audit log", "GET", "/v1/audit", nil},
		{"clear agents", "DELETE", "/v1/agents", nil},
		{"clear templates", "DELETE", "/v1/templates", nil},
		{"delete an agent", "DELETE", agent, nil},
		{"create a role", "POST", "/v1/roles", map[string]any{"name": "mine", "permissions": []string{"*"}}},
		{"change a role's permissions", "PATCH", "/v1/roles/" + role, map[string]any{"permissions": []string{"*"}}},
		{"delete a role", "DELETE", "/v1/roles/" + role, nil},
		{"list users", "GET", "/v1/users", nil},
		{"read a user", "GET", "/v1/users/" + owner.ID, nil},
		{"make a superadmin", "PATCH", "/v1/users/" + member.ID, map[string]any{"is_superadmin": true}},
		{"grant type-wide", "POST", "/v1/acl", map[string]any{"resource_type": "Agent", "principal_id": member.ID, "action": "*", "effect": "allow"}},
		{"list type-wide entries", "GET", "/v1/acl", nil},
		{"grant on another's agent", "POST", agent + "/acl", map[string]any{"principal_id": member.ID, "action": "*", "effect": "allow"}},
		{"rename the organization", "PATCH", "/v1/organizations/" + owner.Org, map[string]any{"name": "pwned"}},
		{"delete the organization", "DELETE", "/v1/organizations/" + owner.Org, nil},
	} {
		secExpect(t, "a member may not "+req.what, m.Do(req.method, req.path, req.body), 403)
	}
	secExpect(t, "a viewer may not create agents", v.Do("POST", "/v1/agents", map[string]any{"name": "v"}), 403)
	secExpect(t, "a viewer may not create API keys", v.Do("POST", "/v1/api-keys", map[string]any{"name": "v"}), 403)
	// The member still does what members do.
	m.Must(201, "POST", "/v1/agents", map[string]any{"name": "m"})
	m.Must(200, "GET", agent, nil)

	events := secAudit(t, owner.Client, "outcome=denied&actor_id="+member.ID)
	for _, action := range []string{"Membership.create", "Membership.update", "Agent.clear", "Agent.delete", "Role.create", "User.list", "audit.read", "acl.grant", "Organization.update"} {
		if !secHasAudit(events, member.ID, action, "denied") {
			t.Errorf("no denied %s in the audit log", action)
		}
	}
	if !secHasAudit(secAudit(t, owner.Client, "outcome=denied&actor_id="+viewer.ID), viewer.ID, "Agent.create", "denied") {
		t.Error("no denied Agent.create by the viewer in the audit log")
	}
	if r := m.Do("GET", "/v1/audit?outcome=denied", nil); r.Status != 403 {
		t.Fatalf("the member reads the audit log: %d", r.Status)
	}
}

func TestOWASPAPI5NarrowKeyOfAnAdmin(t *testing.T) {
	t.Parallel()
	s := NewStack(t, nil)
	c := s.Client(s.API())
	owner := c.NewUser("owner")
	key := owner.Must(201, "POST", "/v1/api-keys", map[string]any{"name": "reader", "permissions": []string{"Agent.read"}}).Str(t, "key")
	reader := owner.As(key, "")
	reader.Must(200, "GET", "/v1/agents", nil)
	// A key's scope caps every decision: an owner's read-only key does
	// not administer the organization.
	var got []string
	for _, req := range []struct {
		method, path string
		body         any
	}{
		{"GET", "/v1/audit", nil},
		{"PATCH", "/v1/organizations/" + owner.Org, map[string]any{"name": "renamed by a read-only key"}},
		{"POST", "/v1/members", map[string]any{"email": owner.Email, "role": "admin"}},
		{"POST", "/v1/roles", map[string]any{"name": "x", "permissions": []string{"*"}}},
		{"GET", "/v1/acl", nil},
		{"DELETE", "/v1/agents", nil},
		// Nor its owner's account and notifications.
		{"PATCH", "/v1/users/me", map[string]any{"name": "renamed by a key"}},
		{"PUT", "/v1/users/me/notification-preferences", map[string]any{"muted": []string{"command.succeeded"}}},
		{"GET", "/v1/notifications", nil},
		{"POST", "/v1/notifications/read-all", nil},
	} {
		if r := reader.Do(req.method, req.path, req.body); r.Status != 403 {
			got = append(got, fmt.Sprintf("%s %s → %d", req.method, req.path, r.Status))
		}
	}
	if len(got) > 0 {
		t.Fatalf("an admin's API key scoped to Agent.read still does %s", strings.Join(got, ", "))
	}
}
