package e2e

import "testing"

func TestRegisterLoginMe(t *testing.T) {
	t.Parallel()
	s := NewStack(t, nil)
	api := s.API()
	c := s.Client(api)
	u := c.NewUser("ada")
	me := u.Must(200, "GET", "/v1/users/me", nil).JSON(t)
	if me["email"] != u.Email || me["password_hash"] != nil {
		t.Fatalf("me: %v", me)
	}
}
