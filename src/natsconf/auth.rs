//! The `authorization { users = [...] }` block of a leaf or of the hub,
//! as a typed description: `presenced acl` and `acl-hub` build one from
//! the ownership map and [`render`] writes it, through the same text
//! writer as the rest of a nats-server config. Every user is in the
//! description before anything is written, so nothing is spliced into
//! rendered text.

use super::render::{quote, Text};

/// One allow or deny subject, with why it is there (written as a comment
/// above each run of subjects that share a reason).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub subject: String,
    pub why: String,
}

/// How a user proves who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// An NKEY public key (`U...`).
    Nkey(String),
    /// A user name and a bcrypt hash of its password (MQTT clients, which
    /// have no NKEYs); never a password in plain text.
    Password { user: String, bcrypt: String },
}

/// One user of the block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// The comment above the user: who it is and what it may do.
    pub comment: String,
    pub credential: Credential,
    /// `allowed_connection_types` (e.g. `LEAFNODE`, `MQTT`); empty: any.
    pub connection_types: Vec<String>,
    pub publish_allow: Vec<Rule>,
    pub publish_deny: Vec<Rule>,
    pub subscribe_allow: Vec<Rule>,
}

/// The whole block, with the comment lines above it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Authorization {
    pub header: Vec<String>,
    pub users: Vec<User>,
}

/// The block as nats-server config text; the same description gives the
/// same bytes.
pub fn render(auth: &Authorization) -> String {
    let mut t = Text::default();
    for line in &auth.header {
        t.comment(line);
    }
    t.open("authorization");
    t.line("users = [");
    t.indent += 1;
    for u in &auth.users {
        user(&mut t, u);
    }
    t.indent -= 1;
    t.line("]");
    t.close();
    t.out
}

fn user(t: &mut Text, u: &User) {
    t.comment(&u.comment);
    t.line("{");
    t.indent += 1;
    match &u.credential {
        Credential::Nkey(key) => t.line(&format!("nkey: {}", quote(key))),
        Credential::Password { user, bcrypt } => {
            t.line(&format!("user: {}", quote(user)));
            t.line(&format!("password: {}", quote(bcrypt)));
        }
    }
    if !u.connection_types.is_empty() {
        let types: Vec<String> = u.connection_types.iter().map(|c| quote(c)).collect();
        t.line(&format!("allowed_connection_types: [{}]", types.join(", ")));
    }
    t.open("permissions:");
    t.open("publish:");
    rules(t, "allow", &u.publish_allow);
    if !u.publish_deny.is_empty() {
        rules(t, "deny", &u.publish_deny);
    }
    t.close();
    t.open("subscribe:");
    rules(t, "allow", &u.subscribe_allow);
    t.close();
    t.close();
    t.indent -= 1;
    t.line("}");
}

fn rules(t: &mut Text, key: &str, rules: &[Rule]) {
    if rules.is_empty() && key == "allow" {
        // nats-server reads an empty allow list as "no restriction".
        t.comment("nothing is allowed");
        t.line("deny: [\">\"]");
        return;
    }
    t.line(&format!("{key}: ["));
    t.indent += 1;
    let mut last_why = "";
    for r in rules {
        if r.why != last_why {
            t.comment(&r.why);
            last_why = &r.why;
        }
        t.line(&quote(&r.subject));
    }
    t.indent -= 1;
    t.line("]");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(subject: &str, why: &str) -> Rule {
        Rule {
            subject: subject.into(),
            why: why.into(),
        }
    }

    #[test]
    fn a_block_with_every_kind_of_user() {
        let auth = Authorization {
            header: vec!["generated".into()],
            users: vec![
                User {
                    comment: "service a: reads".into(),
                    credential: Credential::Nkey("UKEY".into()),
                    connection_types: vec![],
                    publish_allow: vec![rule("a.>", "one"), rule("b.>", "one")],
                    publish_deny: vec![rule("a.x", "two")],
                    subscribe_allow: vec![],
                },
                User {
                    comment: "MQTT user m".into(),
                    credential: Credential::Password {
                        user: "m".into(),
                        bcrypt: "$2a$11$abc".into(),
                    },
                    connection_types: vec!["MQTT".into()],
                    publish_allow: vec![rule("t.>", "topics")],
                    publish_deny: vec![],
                    subscribe_allow: vec![rule("t.>", "topics")],
                },
            ],
        };
        let want = r#"# generated
authorization {
  users = [
    # service a: reads
    {
      nkey: "UKEY"
      permissions: {
        publish: {
          allow: [
            # one
            "a.>"
            "b.>"
          ]
          deny: [
            # two
            "a.x"
          ]
        }
        subscribe: {
          # nothing is allowed
          deny: [">"]
        }
      }
    }
    # MQTT user m
    {
      user: "m"
      password: "$2a$11$abc"
      allowed_connection_types: ["MQTT"]
      permissions: {
        publish: {
          allow: [
            # topics
            "t.>"
          ]
        }
        subscribe: {
          allow: [
            # topics
            "t.>"
          ]
        }
      }
    }
  ]
}
"#;
        assert_eq!(render(&auth), want);
    }
}
